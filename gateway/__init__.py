"""The egress gateway: dedicated pods on gateway nodes that give selected traffic a stable IP.

Owns egress IP slots (one lease per IP, taken only while held), the IP on the external
interface with gratuitous ARP, the gateway's own WireGuard interface with one peer per
node, SNAT of allowed sources to the slot's IP, health probe answers and slot status.
"""
