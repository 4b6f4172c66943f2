"""The verified demo and its sandbox.  The core never imports this package; inside it, arrows point
down this list (a module imports only those below it):

- `run`: `pyexec demo`: the SQLite demo (a live application snapshotted and verified), or `dbdemo`.
- `dbdemo`: `pyexec demo --db`: a database server under load snapshotted with its quiescer, restored
  on a second server and verified; `dbsite` (the sandbox, the server, one round), `dbrestore` (the
  restores), `dbverify` (the engines' checks, the promises), `ledger` (the ledger writer and its
  checks), `dbload` (pgbench, the transaction writers), `dbsummary` (the printed summary).
- `servers`: the private PostgreSQL and MariaDB servers: `pgserver`, `mariadbserver`, what they
  share (`dbserver`) and their processes (`processes`).
- `app` (the SQLite application), `sandbox` (loop images, reflink), `loopfs` (a loop-mounted
  filesystem), `output` (progress, the report), `safeio` (files in other accounts' directories), `etcdserver` (private etcd clusters for the fleet) on
  `netlab` (simulated hosts: network namespaces on one bridge)."""
