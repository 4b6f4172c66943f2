"""Across machines: one consistent snapshot of many hosts, coordinated through etcd (docs/fleet.md).

`agent` runs on every host, `worker` is one host's part of one group run, `coordinator` is
`group_run`; `protocol` declares the keys, the plan and the bounds, `etcd` is the client."""
