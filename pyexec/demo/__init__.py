"""The verified demo and its sandbox: loop-mounted filesystems made and removed here (loopfs.py), a
live SQLite application (app.py), the run that snapshots and verifies it (run.py), private
PostgreSQL and MariaDB servers for the database quiescers (servers.py), and the demo that snapshots
one of them under load with its quiescer, restores it on a second server and verifies it
(dbdemo.py).  The core never imports this package."""
