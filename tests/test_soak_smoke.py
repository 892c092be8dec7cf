"""A few seconds of benchmarks/soak.py, so the soak script keeps working and keeps its exit-code contract."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import ROOT, subprocess_env

SOAK = ROOT / "benchmarks" / "soak.py"
FIGURES = re.compile(r"rss=[\d.]+ MiB  fds=\d+  asyncio_tasks=\d+")


def run_soak(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SOAK), *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )


def test_a_short_soak_exits_0_and_prints_its_figures() -> None:
    result = run_soak("--duration", "5", "--org-sets", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for stage in ("start", "warm", "end"):
        assert re.search(rf"^{stage}: +{FIGURES.pattern}", out, re.MULTILINE), out
    attempts = re.search(r"^poll attempts=(\d+)", out, re.MULTILINE)
    scrapes = re.search(r"^scrapes answered=(\d+) failed=0", out, re.MULTILINE)
    assert attempts and int(attempts.group(1)) >= 5 * 4 * 3, out  # 20 schedules, 1 s interval, 5 s
    assert scrapes and int(scrapes.group(1)) > 0, out
    assert out.rstrip().endswith("soak: OK")
    assert "Traceback" not in result.stderr


def test_soak_exits_1_when_a_resource_grows_beyond_its_tolerance() -> None:
    # A negative tolerance cannot be met: the gate itself must turn that into a failure.
    result = run_soak("--duration", "2", "--org-sets", "2", "--max-fd-growth", "-1000")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL: open file descriptors grew by" in result.stdout
    assert result.stdout.rstrip().endswith("soak: FAILED")
