"""The CNI plugin: a standard-library shim on each node plus its server half in the agent.

Owns pod wiring (routed veth, /32 address, link-local gateway answered by proxy ARP),
per-node IPAM with persistent allocations and garbage collection, and the CNI 1.1
commands ADD, DEL, CHECK, VERSION, GC and STATUS.

Keep this file free of imports: the plugin binary imports `cni.plugin`, and everything it
pulls in must be the standard library so it starts in milliseconds.
"""
