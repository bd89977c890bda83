"""The lab: a whole meshgress cluster in network namespaces on one machine.

`topology` computes the lab's shape (pure), `netns` wraps the tools that build it,
`lab` builds, inspects and removes it, `echo` is the outside host's witness service,
and `demo` shows what the lab proves. The lab is also the end-to-end test bed.
"""
