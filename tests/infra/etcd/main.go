// Command etcd is etcd's own server, built from the pinned go.etcd.io/etcd/server/v3
// release, so the test control plane needs no etcd package from a distribution.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
