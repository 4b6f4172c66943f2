"""The hostile tests' attacker is a real unprivileged account: it cannot do what root can."""
from __future__ import annotations

import os
import pwd

from helpers import needs_root

pytestmark = needs_root


def test_local_user_is_unprivileged_and_removed(local_user, tmp_path):
    r = local_user.run(["id", "-u"])
    assert r.returncode == 0 and int(r.stdout) == local_user.uid != 0
    secret = tmp_path / "secret"
    secret.write_text("x")
    os.chmod(secret, 0o600)
    r = local_user.run(["cat", str(secret)])
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert pwd.getpwnam(local_user.name).pw_uid == local_user.uid
