"""Built-in quiescers: a database session opened before the window, held through the freeze and the
snapshot, and released after the thaw, inside pyexec's process.

Why not a pre-script: MySQL's FLUSH TABLES WITH READ LOCK lives only as long as the session that
took it, so `mysql -e "FLUSH TABLES WITH READ LOCK"` in a pre-script releases it when the client
exits, before the freeze.  A quiescer is a plugin of the host config (`pluginName<i> = postgresql`
or `mariadb`/`mysql`) whose phases run where a script's would: its quiesce in the pre-phase, its
release in the post-phase (so on every path where a post-script runs), each bounded by the plugin's
timeoutInSeconds and by a signal to pyexec.  If pyexec is SIGKILLed, the kernel closes the socket and
the server ends the session and its lock: nothing outlives the run."""
from __future__ import annotations

from pyexec.quiesce.quiescer import DRIVERS, Quiescer, load_driver, prepare, read_password
from pyexec.quiesce.session import ABORT_CONNECT_S, Failed, Session, close_quietly, shutdown_fd

__all__ = ["ABORT_CONNECT_S", "DRIVERS", "Failed", "Quiescer", "Session", "close_quietly", "load_driver", "prepare",
           "read_password", "shutdown_fd"]
