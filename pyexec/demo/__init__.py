"""The verified demo and its sandbox: loop-mounted filesystems made and removed here (loopfs.py), a
live SQLite application (app.py), the run that snapshots and verifies it (run.py) and private
PostgreSQL and MariaDB servers for the database quiescers (servers.py).  The core never
imports this package."""
