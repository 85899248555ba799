"""Running a task list (built-in and harness tasks) and recording what it gave.

Results use the harness's layout (`results[task][metric]`, plus `configs`, `versions`, `n-shot`
for harness tasks) and add the model's run config, the checkpoint it came from and the engine's
throughput, so the JSON files of a sweep can be tabulated side by side.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import IO, Any

from jaxlm.evaluation import builtin
from jaxlm.evaluation.engine import Engine, Throughput
from jaxlm.run.metrics import format_duration

BUILTIN = "builtin"


def split_tasks(tasks: str | list[str]) -> tuple[list[str], list[str]]:
    """(built-in task names, harness task names) of a comma-separated list; "builtin" is
    every built-in task."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    local, harness = [], []
    for name in filter(None, names):
        if name == BUILTIN:
            local += [t for t in builtin.TASKS if t not in local]
        elif name in builtin.TASKS:
            local += [name] if name not in local else []
        else:
            harness.append(name)
    return local, harness


class ProgressBar:
    """One line on stderr: requests done over the task list, rate and ETA."""

    def __init__(self, total: int, stream: IO[str] | None = sys.stderr, every_s: float = 0.5):
        self.total, self.done, self.stream, self.every_s = total, 0, stream, every_s
        self.t0 = self._last = time.perf_counter()
        self.label = ""

    def add_total(self, n: int) -> None:
        """More requests to come (harness request lists arrive one type at a time)."""
        self.total += n

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.stream is not None and (now - self._last >= self.every_s
                                        or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = max(self.total - self.done, 0) / max(rate, 1e-9)
            width = 24
            filled = int(width * min(self.done / max(self.total, 1), 1.0))
            self.stream.write(f"\r{self.label:<18} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.done}/{self.total} requests | {rate:.1f}/s | "
                              f"eta {format_duration(eta)}  ")
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


def run_tasks(engine: Engine, tasks: str | list[str], *, limit: int = 0,
              include_path: str = "", num_fewshot: int | None = None,
              progress: bool = True, heldout: builtin.HeldOut | None = None
              ) -> dict[str, Any]:
    """Every task on the engine's current params; harness-layout results + throughput. The
    built-in tasks read `heldout` (default: the default stdlib corpus's held-out split)."""
    local, harness_tasks = split_tasks(tasks)
    if not local and not harness_tasks:
        raise ValueError("no tasks given")
    limits = {t: limit or builtin.DEFAULT_LIMITS[t] for t in local}
    bar = ProgressBar(sum(builtin.requests_of(t, n) for t, n in limits.items()),
                      sys.stderr if progress else None)
    out: dict[str, Any] = {"results": {}, "configs": {}, "versions": {}, "n-shot": {}}
    engine.throughput = Throughput()
    t0 = time.perf_counter()
    try:
        for name in local:
            bar.label = name
            out["results"][name] = {"alias": name,
                                    **builtin.TASKS[name](engine, limits[name], bar,
                                                          heldout)}
            out["versions"][name] = "builtin-1"
            out["n-shot"][name] = 0
        if harness_tasks:
            from jaxlm.evaluation import harness  # needs the optional lm-eval package

            bar.label = "harness"
            got = harness.evaluate(engine, harness_tasks, include_path=include_path,
                                   limit=limit, num_fewshot=num_fewshot,
                                   progress=bar if progress else None)
            for key in ("results", "configs", "versions", "n-shot", "higher_is_better",
                        "n-samples"):
                out.setdefault(key, {}).update(got.get(key) or {})
    finally:
        bar.close()
    out["throughput"] = {**engine.throughput.summary(),
                         "wall_seconds": time.perf_counter() - t0}
    return out


def metric_name(key: str) -> str:
    """"acc,none" (the harness's metric,filter key) -> "acc"; other filters are kept."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def flat_metrics(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """{"eval/<task>/<metric>": value} of the numeric results (stderr entries left out)."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = metric_name(key)
            if name.endswith("_stderr") or "_stderr_" in name:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            flat[f"{prefix}/{task}/{name}"] = float(value)
    return flat


def format_table(results: dict[str, Any]) -> str:
    rows = [(k.split("/")[1], k.split("/", 2)[2], v)
            for k, v in flat_metrics(results).items()]
    width_t = max([len("task")] + [len(r[0]) for r in rows])
    width_m = max([len("metric")] + [len(r[1]) for r in rows])
    lines = [f"{'task':<{width_t}} | {'metric':<{width_m}} | value",
             f"{'-' * width_t}-|-{'-' * width_m}-|-{'-' * 10}"]
    lines += [f"{t:<{width_t}} | {m:<{width_m}} | {v:.4g}" for t, m, v in rows]
    tp = results.get("throughput")
    if tp:
        lines.append(f"{tp['requests']} requests in {tp['wall_seconds']:.1f}s: "
                     f"{tp['requests_per_sec']:.1f} requests/s, "
                     f"{tp['tokens_per_sec']:,.0f} tokens/s")
    return "\n".join(lines)


def default_path(workdir: str, step: int) -> str:
    """<workdir>/eval/results_step<N>.json, next to <workdir>/checkpoints."""
    root = workdir.rstrip("/")
    if os.path.basename(root) == "checkpoints":
        root = os.path.dirname(root)
    return os.path.join(root, "eval", f"results_step{step}.json")


def write_results(results: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(tmp, path)
