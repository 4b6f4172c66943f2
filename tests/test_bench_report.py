"""`make bench`'s last step, benchmarks/report.py, on the JSON of a real (small) pytest-benchmark run:
it writes the markdown table and the plot, so the bench command cannot rot between runs."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from helpers import needs_root

ROOT = pathlib.Path(__file__).resolve().parent.parent


@needs_root
def test_report_from_a_real_benchmark_run(tmp_path):
    js = tmp_path / "bench.json"
    pytest = pathlib.Path(sys.executable).parent / "pytest"  # not `-m pytest`: that would import the source tree
    run = subprocess.run([str(pytest), "-q", "-p", "no:cacheprovider", str(ROOT / "benchmarks"),
                          "-k", "spawn_os_posix or window and ext4-1-idle or group_run and 2hosts-1member",
                          "--benchmark-only",
                          "--benchmark-min-rounds=3", f"--benchmark-json={js}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, PYEXEC_FLEET_ROUNDS="2"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rep = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(js), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "bench.md").read_text()
    assert "### spawn + wait of /bin/true" in md and "| os_posix_spawn |" in md
    assert "| ext4 | 1 | idle | callback |" in md and "| ext4 | 1 | idle | command |" in md
    png = (tmp_path / "window-overhead.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert "### Group runs:" in md and "| 2 | 1 |" in md
    png = (tmp_path / "fleet-windows.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
