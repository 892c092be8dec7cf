"""Every benchmark, one after the other, printing the tables README "Performance" shows.

    python benchmarks/run_all.py                 # the README run (N = 10, 100, 1000; about 15 minutes)
    python benchmarks/run_all.py --smoke         # a tiny run of each (a minute): do they all work

Each script runs in its own interpreter (and each size in a fresh one inside it), with the
simulator and the load generator in processes of their own, so one script's memory or CPU does
not colour the next. The figures of every script also go to --json-dir as JSON.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, child_env, machine

HERE = Path(__file__).resolve().parent
SCRIPTS = (  # script, its arguments for the README run
    ("poll_cycle.py", ()),
    ("scrape.py", ()),
    ("footprint.py", ()),
    ("reload.py", ("--sizes", "1000")),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny run of each script")
    parser.add_argument("--json-dir", type=Path, help="write each script's raw figures here")
    args = parser.parse_args()
    print(f"# run_all: {machine()}", flush=True)
    began = time.monotonic()
    failed = []
    for script, options in SCRIPTS:
        extra = ["--smoke"] if args.smoke else list(options)
        if args.json_dir is not None:
            args.json_dir.mkdir(parents=True, exist_ok=True)
            extra += ["--json", str(args.json_dir / f"{Path(script).stem}.json")]
        started = time.monotonic()
        print(f"\n$ python benchmarks/{script} {' '.join(extra)}".rstrip(), flush=True)
        done = subprocess.run([sys.executable, str(HERE / script), *extra], cwd=ROOT, env=child_env(), check=False)
        print(f"({script}: {time.monotonic() - started:.0f} s)", flush=True)
        if done.returncode != 0:
            failed.append(script)
    outcome = f"; FAILED: {', '.join(failed)}" if failed else ""
    print(f"\n# run_all: {time.monotonic() - began:.0f} s in all{outcome}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
