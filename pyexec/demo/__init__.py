"""The verified demo and its sandbox: loop-mounted filesystems made and removed here (loopfs.py), a
live SQLite application (app.py) and the run that snapshots and verifies it (run.py).  The core never
imports this package."""
