"""The CNI plugin: a standard-library shim on each node plus its server half in the agent.

Owns pod wiring (routed veth, /32 address, link-local gateway answered by proxy ARP),
per-node IPAM with persistent allocations and garbage collection, and the CNI 1.1
commands ADD, DEL, CHECK, VERSION, GC and STATUS.

The plugin binary is `cni/plugin.py` alone, installed as one flat file by `cni.install`:
it must not import anything from this package (or outside the interpreter's built-ins),
so that it starts in milliseconds.
"""
