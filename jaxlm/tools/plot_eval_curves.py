"""Held-out loss against step of several runs in one PNG (e.g. a distilled student and the same
student trained with cross-entropy only, docs/distillation.md).

    python -m jaxlm.tools.plot_eval_curves --out=docs/img/distill_tiny.png \
        --run="distilled=/tmp/student_kd" --run="cross-entropy only=/tmp/student_ce"

Each --run is label=workdir (split at the last "="); the curve is the `eval_loss` rows of
<workdir>/metrics.jsonl (the last row of a step wins, as after a resume). Prints each run's
final held-out loss.
"""

import json
import os

from absl import app, flags

_RUNS = flags.DEFINE_multi_string("run", [], "label=workdir, once per curve.")
_OUT = flags.DEFINE_string("out", None, "PNG to write.")
_TITLE = flags.DEFINE_string("title", "", "Plot title.")
flags.mark_flag_as_required("out")


def eval_curve(workdir: str) -> tuple[list[int], list[float]]:
    """Steps and eval_loss values of a run's metrics.jsonl, by step."""
    by_step: dict[int, float] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "eval_loss" in row:
                by_step[int(row["step"])] = float(row["eval_loss"])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def main(argv: list[str]) -> None:
    del argv
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for spec in _RUNS.value:
        label, workdir = spec.rsplit("=", 1)
        steps, losses = eval_curve(workdir)
        ax.plot(steps, losses, marker="o", label=label)
        print(f"{label}: final held-out loss {losses[-1]:.4f} at step {steps[-1]}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    if _TITLE.value:
        ax.set_title(_TITLE.value)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(_OUT.value, dpi=120)


if __name__ == "__main__":
    app.run(main)
