"""Times the two test tiers of the README's development section on this machine.

    python tools/test_tiers.py            # both tiers
    python tools/test_tiers.py --tier=fast

Runs `pytest -q -m "not slow"` (the tier to run while working) and `pytest -q` (everything, what
CI runs), each as a fresh process, and prints one markdown row per tier: wall time, the pytest
summary line, the machine's cores and the CPU pressure (`/proc/pressure/cpu` "some avg60")
before and after, so a figure taken on a busy machine says so.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIERS = {"fast": ["-m", "not slow"], "full": []}


def cpu_pressure() -> str:
    """The CPU's "some avg60" pressure in percent, or "?" where the kernel does not report it."""
    try:
        with open("/proc/pressure/cpu") as f:
            return re.search(r"avg60=([\d.]+)", f.readline()).group(1)
    except (OSError, AttributeError):
        return "?"


def run_tier(name: str) -> str:
    before = cpu_pressure()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *TIERS[name]], cwd=ROOT,
                          capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    summary = next((line.strip("= ") for line in reversed(proc.stdout.splitlines())
                    if " passed" in line or " failed" in line), "no summary")
    command = "pytest -q " + " ".join(f'"{a}"' if " " in a else a for a in TIERS[name])
    return (f"| `{command.strip()}` | {minutes:.1f} min | "
            f"{summary} | {os.cpu_count()} cores, CPU pressure {before}% -> {cpu_pressure()}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=["fast", "full", "both"], default="both")
    args = parser.parse_args()
    names = ["fast", "full"] if args.tier == "both" else [args.tier]
    print("| command | wall time | result | machine |\n| --- | --- | --- | --- |")
    for name in names:
        print(run_tier(name), flush=True)


if __name__ == "__main__":
    main()
