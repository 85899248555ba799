"""The README quickstart's defaults against the alternatives they were chosen over.

    python benchmarks/first_run.py --work_dir=/tmp/first_run [--variants=before,after]

Each variant is `python -m jaxlm.main --config=configs/tiny.py` with a few overrides, all from
the same seed, sharing one corpus and tokenizer cache (built by the first variant, outside its
timing). Reported per variant: training tokens, wall time of the whole command, the held-out
loss of the last eval (configs/tiny.py's 16 eval batches, 32k tokens) and the last logged
greedy sample. Prints a markdown table for docs/benchmarks.md; run it on a quiet machine
(`/proc/pressure/cpu`) for the wall times to mean anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (what it is, overrides of configs/tiny.py)
VARIANTS = {
    "before": ("200 steps, no row shuffle, prompt 'def ' (the defaults until 2026-11-26)",
               ["--config.train.steps=200", "--config.data.shuffle_rows=0",
                "--config.log.sample_prompt=def "]),
    "shuffle": ("200 steps with the row shuffle", ["--config.train.steps=200"]),
    "batch32": ("200 steps, batch 32 (the tokens of 400 x 16)",
                ["--config.train.steps=200", "--config.train.global_batch_size=32"]),
    "lr6e-3": ("200 steps, learning rate 6e-3", ["--config.train.steps=200",
                                                  "--config.optim.learning_rate=6e-3"]),
    "d128": ("200 steps, d_model 128, d_ff 512, batch 48, learning rate 6e-3",
             ["--config.train.steps=200", "--config.model.d_model=128",
              "--config.model.d_ff=512", "--config.train.global_batch_size=48",
              "--config.optim.learning_rate=6e-3"]),
    "steps400": ("400 steps", ["--config.train.steps=400"]),
    "after": ("the defaults: 600 steps, batch 16, learning rate 3e-3, row shuffle", []),
}

_WORK_DIR = flags.DEFINE_string("work_dir", None, "Run directories and the shared cache.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Which of " + ", ".join(VARIANTS))


def cpu_pressure() -> str:
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[1]
    except OSError:
        return "n/a"


def run_variant(name: str, work_dir: str, cache_dir: str) -> dict:
    workdir = os.path.join(work_dir, name)
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resume of an earlier one
    cmd = [sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py",
           f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}"
           ] + VARIANTS[name][1]
    before = cpu_pressure()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval_loss" in r]
    tokens = max(r.get("tokens_seen", 0) for r in rows)
    with open(os.path.join(workdir, "log.txt")) as f:
        samples = re.findall(r"sample at step \d+: (.*)", f.read())
    return {"name": name, "tokens": int(tokens), "seconds": seconds,
            "eval_loss": evals[-1]["eval_loss"], "step": evals[-1]["step"],
            "sample": samples[-1] if samples else "", "pressure": f"{before}/{cpu_pressure()}"}


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    work_dir = os.path.abspath(_WORK_DIR.value)
    cache_dir = os.path.join(work_dir, "cache")
    os.makedirs(work_dir, exist_ok=True)
    # Build the corpus and tokenizer once, untimed: every variant then starts alike.
    warm_cmd = [sys.executable, "-m", "jaxlm.main", "--config=configs/tiny.py:steps=1",
                f"--workdir={os.path.join(work_dir, 'warm')}", "--config.eval.every_steps=0",
                f"--config.data.cache_dir={cache_dir}"]
    subprocess.run(warm_cmd, cwd=ROOT, check=True, capture_output=True)
    results = []
    for name in _VARIANTS.value:
        results.append(run_variant(name, work_dir, cache_dir))
        print(json.dumps(results[-1]), flush=True)
    lines = ["| variant | what | tokens | wall s | held-out loss | CPU some avg10 % "
             "(before/after) |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r['name']} | {VARIANTS[r['name']][0]} | {r['tokens']:,} | "
                     f"{r['seconds']:.0f} | {r['eval_loss']:.3f} | {r['pressure']} |")
    lines += ["", "Last logged samples:", ""]
    lines += [f"* {r['name']} (step {r['step']}): `{r['sample']}`" for r in results]
    print("\n".join(lines))


if __name__ == "__main__":
    flags.mark_flag_as_required("work_dir")
    app.run(main)
