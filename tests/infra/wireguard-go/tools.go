//go:build tools

// Package tools pins the userspace WireGuard implementation, wireguard-go, whose main
// package is the module's root; tests/infra/build-binaries runs
// `go build golang.zx2c4.com/wireguard` here. The module has no semver tags, so the
// pinned version is the proxy's pseudo-version of the newest release commit.
package tools

import _ "golang.zx2c4.com/wireguard"
