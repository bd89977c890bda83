//go:build tools

// Package tools pins the kube-apiserver command in this module's dependency graph; it is
// never compiled. tests/infra/build-binaries runs `go build k8s.io/kubernetes/cmd/kube-apiserver`
// here, so the test control plane runs a real API server of the pinned release.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
