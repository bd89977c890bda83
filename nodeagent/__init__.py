"""The node agent: one per node, host network, NET_ADMIN.

Owns this node's dataplane. Watches fill caches (no kernel I/O there); pure functions
compute the desired state from the caches; plans diff it against the kernel as it is now;
thin apply adapters program the WireGuard mesh, routes and rules, the `inet meshgress`
nftables table and egress steering; it also serves the CNI socket, metrics and health.
"""
