"""The verified demo and its sandbox.  The core never imports this package; inside it, arrows point
down this list (a module imports only those below it):

- `run`: `pyexec demo`: the SQLite demo (a live application snapshotted and verified), or `dbdemo`,
  or `fleetdemo`.
- `fleetdemo`: `pyexec demo --hosts N [--compare]`: group snapshots of simulated hosts under load,
  restored and checked; `fleetsite` (the hosts, their branches, configs and agents, etcd, the lab).
- `bankcheck`: the fleet demo's checker (restored ledgers of one cut: the total and every transfer
  in both ledgers or neither); `bank`: the fleet demo's application (a branch per host moving money
  over TCP, quiesced over a control socket).
- `dbdemo`: `pyexec demo --db`: a database server under load snapshotted with its quiescer, restored
  on a second server and verified; `dbsite` (the sandbox, the server, one round), `dbrestore` (the
  restores), `dbverify` (the engines' checks, the promises), `ledger` (the ledger writer and its
  checks), `dbload` (pgbench, the transaction writers), `dbsummary` (the printed summary).
- `servers`: the private PostgreSQL and MariaDB servers: `pgserver`, `mariadbserver`, what they
  share (`dbserver`) and their processes (`processes`).
- `app` (the SQLite application), `hostconf` (a host's root-owned config and scripts), `sandbox`
  (loop images, reflink), `loopfs` (a loop-mounted filesystem), `output` (progress, the report),
  `safeio` (files in other accounts' directories), `etcdserver` (private etcd clusters for the
  fleet) on `netlab` (simulated hosts: network namespaces on one bridge)."""
