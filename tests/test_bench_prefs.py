"""bench/bench_prefs.py --demo runs the demo's build on the shipped base and accounts for its time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_bench_reports_ratio_and_where_the_time_goes():
    run = subprocess.run([sys.executable, str(ROOT / "bench/bench_prefs.py"), "--demo", "--captions", "2",
                          "--repeats", "1", "--threads", "1"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    samples, pairs = (int(x) for x in re.search(r"samples=(\d+) pairs=(\d+)", out).groups())
    assert samples > pairs > 0
    built = float(re.search(r"preference builder:\s+([\d.]+) s", out).group(1))
    parts = [float(x) for x in re.findall(r"(?:loop|decode|vocoder|scoring|write\)) ([\d.]+) s", out)]
    assert len(parts) == 5 and abs(sum(parts) - built) < 0.2  # the parts add up to the build
    assert parts[0] > max(parts[1:4])  # the denoising loop dominates, as on every measured run
    assert re.search(r"builder / raw sampling = [\d.]+", out)
