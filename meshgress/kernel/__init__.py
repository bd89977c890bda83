"""The kernel-plumbing library: every conversation meshgress has with the Linux kernel's
networking, written once.

Agents, gateways and the CNI plugin all program the same few kernel objects — links,
addresses, routes, policy rules, per-interface sysctls and one nftables table each — and
used to carry their own copies of the rtnetlink constants, structs and sockets. This
package is the one copy:

- `rtnetlink`: the rtnetlink message codec (pure): constants, attributes, and the
  requests and replies for links, addresses, routes, rules and IPv4 device settings;
- `rtnl`: `Rtnl`, one NETLINK_ROUTE socket that sends those messages (batched, with
  extended-ack errors), and its two notification watches, `NetconfWatch` and `LinkWatch`;
  `read_socket_facts`, what a socket handed over by another process really is;
- `netns`: entering a network namespace from a thread (setns), and running code there;
  which namespace a socket lives in, and what tells namespaces apart;
- `sysctl`: reading and ensuring /proc/sys values;
- `nft_model`: the generic nftables model (sets, maps, counters, chains, rules) and the
  pure plan that diffs it against `nft -j list table`;
- `nftables`: the libnftables adapter that applies such a plan atomically, and its fake.

Like `wireguard/`, it imports nothing else of meshgress: which table, which marks, which
names are meshgress's is for the callers to say (they live in `meshgress.kernel_ids`).
"""
