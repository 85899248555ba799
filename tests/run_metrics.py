"""Reading a run's workdir from tests: its metrics rows by step, its checkpointed state, and a
copy cut back to an earlier checkpoint (what a run killed right after that save leaves).

Exact-resume tests compare rows with `measured(row)`: every logged value except the wall-clock
ones (speed, MFU, rollout time), which differ between any two runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

# Keys whose values come from the wall clock, not from the computation.
TIMING = frozenset({"steps_per_sec", "tokens_per_sec", "mfu", "time", "wall_time",
                    "rollout_tokens_per_sec", "rollout_fraction", "rollout_seconds"})


def rows(workdir: Path) -> list[dict]:
    """Every row of `workdir`/metrics.jsonl, in order."""
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def by_step(workdir: Path, key: str) -> dict[int, dict]:
    """step -> the last logged row holding `key` (a resumed run re-logs from its restart)."""
    return {r["step"]: r for r in rows(workdir) if key in r}


def measured(row: dict) -> dict:
    """`row` without its wall-clock values."""
    return {k: v for k, v in row.items() if k not in TIMING}


def cut_back(source: Path, target: Path, step: int) -> None:
    """`target` = `source` as a run stopped right after saving checkpoint `step` leaves it."""
    shutil.copytree(source, target)
    for ckpt in (target / "checkpoints").iterdir():
        if ckpt.name.isdigit() and int(ckpt.name) > step:
            shutil.rmtree(ckpt)
    kept = [line for line in (target / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= step]
    (target / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


def state(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """The training state saved at `step`, as a flat {path: array} dict."""
    tree = ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))
    return ocp.tree.to_flat_dict(tree, sep="/")
