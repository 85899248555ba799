"""Logged metrics against step of several runs in one PNG, one panel per metric (e.g. the held-out
loss of a distilled student and of the same student trained with cross-entropy only,
docs/distillation.md, or an RL run's held-out accuracy, reward and KL, docs/rl.md).

    python -m jaxlm.tools.plot_eval_curves --out=docs/img/distill_tiny.png \
        --run="distilled=/tmp/student_kd" --run="cross-entropy only=/tmp/student_ce"
    python -m jaxlm.tools.plot_eval_curves --out=docs/img/grpo_tiny.png --run=grpo=runs/grpo \
        --metrics=eval_accuracy,reward_mean,kl

Each --run is label=workdir (split at the last "="); a curve is the rows of
<workdir>/metrics.jsonl holding the metric (the last row of a step wins, as after a resume).
Prints each run's first and last value of each metric; a run without a metric its panel
shows (a GRPO run beside PPO's reward-model score) is left out of that panel, and a metric no
run has is an error.
"""

import json
import os

from absl import app, flags

_RUNS = flags.DEFINE_multi_string("run", [], "label=workdir, once per curve.")
_OUT = flags.DEFINE_string("out", None, "PNG to write.")
_TITLE = flags.DEFINE_string("title", "", "Plot title.")
_METRICS = flags.DEFINE_list("metrics", ["eval_loss"], "Metrics of metrics.jsonl, a panel each.")
flags.mark_flag_as_required("out")

LABELS = {"eval_loss": "held-out cross-entropy (nats/token)",
          "eval_accuracy": "held-out accuracy (greedy)",
          "eval_reward_mean": "held-out mean reward (greedy)",
          "eval_score_mean": "held-out reward-model score (greedy)",
          "reward_mean": "training reward (mean of samples)",
          "reward_correct": "exact answers among the samples",
          "kl": "KL to the reference (per token)"}


def metric_curve(workdir: str, metric: str) -> tuple[list[int], list[float]]:
    """Steps and values of `metric` in a run's metrics.jsonl, by step."""
    by_step: dict[int, float] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get(metric) is not None:
                by_step[int(row["step"])] = float(row[metric])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def main(argv: list[str]) -> None:
    del argv
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _METRICS.value
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        curves = {spec: metric_curve(spec.rsplit("=", 1)[1], metric) for spec in _RUNS.value}
        if not any(steps for steps, _ in curves.values()):
            raise ValueError(f"no run's metrics.jsonl has {metric!r} rows: "
                             f"{', '.join(spec.rsplit('=', 1)[1] for spec in curves)}")
        for spec, (steps, values) in curves.items():
            label, workdir = spec.rsplit("=", 1)
            if not steps:  # a metric of another run's stage (PPO's reward-model score)
                print(f"{label}: no {metric} rows in {workdir}/metrics.jsonl")
                continue
            ax.plot(steps, values, marker="o" if len(steps) < 40 else None, label=label)
            print(f"{label}: {metric} {values[0]:.4g} at step {steps[0]} -> {values[-1]:.4g} "
                  f"at step {steps[-1]}")
        ax.set_xlabel("step")
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
        ax.legend()
    if _TITLE.value:
        fig.suptitle(_TITLE.value)
    fig.tight_layout()
    fig.savefig(_OUT.value, dpi=120)


if __name__ == "__main__":
    app.run(main)
