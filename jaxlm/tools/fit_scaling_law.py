"""Fits scaling laws to a sweep's results (Chinchilla Approaches 2 and 3) and plots them.

    python -m jaxlm.tools.fit_scaling_law --results=/tmp/isoflop_tiny/results.csv \
        --out_dir=/tmp/isoflop_tiny/fit --target_flops=1e13
    python -m jaxlm.tools.fit_scaling_law --results=tests/data/chinchilla_fig4_points.csv \
        --n_column='Model Size' --flops_column='Training FLOP' --loss_column=loss \
        --exclude_highest_loss=5 --bootstrap=200 --out_dir=/tmp/chinchilla_fit

Reads a CSV with one row per run: N, C (training FLOPs, 6ND), the loss, optionally D (else
C / 6N) and a budget label (Approach 2 groups runs by it; without one Approach 2 is skipped).
The defaults read `jaxlm.tools.sweep`'s results.csv (N, C, D, budget, eval_loss). Prints the fits,
the compute-optimal N and D for each --target_flops, and writes <out_dir>/fit.json,
<out_dir>/loss_vs_compute.png (runs and the Approach 3 frontier) and <out_dir>/isoflop.png
(IsoFLOP curves with their parabolas and minima). The method is described in
jaxlm/scaling/fit.py and docs/scaling.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np
from absl import app, flags

from jaxlm.run import errors
from jaxlm.scaling import fit as scaling_fit

_RESULTS = flags.DEFINE_string("results", None, "CSV of runs (jaxlm.tools.sweep's results.csv).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where fit.json and the plots go; default "
                               "<dir of --results>/fit.")
_N = flags.DEFINE_string("n_column", "N", "Column of parameter counts.")
_C = flags.DEFINE_string("flops_column", "C", "Column of training FLOPs (6ND).")
_D = flags.DEFINE_string("d_column", "D", "Column of training tokens; C / 6N when absent.")
_LOSS = flags.DEFINE_string("loss_column", "eval_loss", "Column of the loss to fit.")
_BUDGET = flags.DEFINE_string("budget_column", "budget", "Column labelling a run's IsoFLOP "
                              "budget (Approach 2); skipped when absent.")
_EXCLUDE = flags.DEFINE_integer("exclude_highest_loss", 0, "Leave out the runs with the k "
                                "highest losses (Besiroglu et al. drop 5 of Chinchilla's).")
_GRID = flags.DEFINE_enum("grid", "paper", ["paper", "small"], "Approach 3 starts: the paper's "
                          "4500, or 32 around typical values (fast).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 100, "Bootstrap resamples of Approach 3.")
_TARGETS = flags.DEFINE_list("target_flops", [], "Budgets to report N_opt, D_opt for.")

SMALL_GRID = {"a": [5.0, 10.0], "b": [5.0, 10.0], "e": [0.0, 0.5], "alpha": [0.3, 0.6],
              "beta": [0.3, 0.6]}


def read_runs(path: str, n_col: str, c_col: str, d_col: str, loss_col: str, budget_col: str,
              exclude_highest_loss: int = 0) -> dict[str, np.ndarray]:
    """Arrays N, D, C, loss (and budget when its column exists) of the finite-loss rows."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    for col in (n_col, c_col, loss_col):
        if col not in rows[0]:
            raise ValueError(f"{path}: no column {col!r} (columns: {list(rows[0])})")
    rows = [r for r in rows if math.isfinite(float(r[loss_col]))]
    out = {"N": np.array([float(r[n_col]) for r in rows]),
           "C": np.array([float(r[c_col]) for r in rows]),
           "loss": np.array([float(r[loss_col]) for r in rows])}
    out["D"] = (np.array([float(r[d_col]) for r in rows]) if d_col in rows[0]
                else out["C"] / (6 * out["N"]))
    if budget_col in rows[0]:
        out["budget"] = np.array([float(r[budget_col]) for r in rows])
    if exclude_highest_loss:
        keep = out["loss"] < np.sort(out["loss"])[-exclude_highest_loss]
        out = {k: v[keep] for k, v in out.items()}
    return out


def plot_loss_vs_compute(path: str, runs: dict[str, np.ndarray],
                         fit3: scaling_fit.Approach3Fit | None,
                         fit2: scaling_fit.Approach2Fit | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = ax.scatter(runs["C"], runs["loss"], c=np.log10(runs["N"]), cmap="viridis", s=18)
    fig.colorbar(points, ax=ax, label="log10 N")
    grid = np.logspace(np.log10(runs["C"].min()) - 0.3, np.log10(runs["C"].max()) + 1.0, 100)
    if fit3 is not None:
        law = fit3.law
        ax.plot(grid, law.optimal_loss(grid), "r-", label=(
            f"Approach 3 frontier: E={law.E:.2f} A={law.A:.3g} B={law.B:.3g} "
            f"α={law.alpha:.2f} β={law.beta:.2f}"))
    if fit2 is not None:
        ax.plot([p.flops for p in fit2.profiles], [p.loss_opt for p in fit2.profiles], "k*",
                ms=10, label="IsoFLOP minima (Approach 2)")
    ax.set(xscale="log", xlabel="training FLOPs C = 6ND", ylabel="loss",
           title="loss vs compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_isoflop(path: str, fit2: scaling_fit.Approach2Fit) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.cm.plasma(np.linspace(0.0, 0.85, len(fit2.profiles)))
    for p, color in zip(fit2.profiles, colors):
        ax.plot(p.n, p.loss, "o", color=color, label=f"C={p.flops:.2g}")
        x = np.linspace(np.log(p.n.min()) - 0.2, np.log(p.n.max()) + 0.2, 100)
        c0, c1, c2 = p.coeffs
        ax.plot(np.exp(x), c0 + c1 * x + c2 * x * x, "-", color=color, lw=1)
        ax.plot([p.n_opt], [p.loss_opt], "k*", ms=10)
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss",
           title=f"IsoFLOP curves: N_opt ∝ C^{fit2.a:.2f}, D_opt ∝ C^{fit2.b:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fit_and_report(runs: dict[str, np.ndarray], out_dir: str, grid: dict[str, Any] | None,
                   bootstrap: int, targets: list[float]) -> dict[str, Any]:
    """Runs both approaches (each when the data allow), writes fit.json and the plots."""
    os.makedirs(out_dir, exist_ok=True)
    report: dict[str, Any] = {"num_runs": len(runs["N"])}
    fit2 = fit3 = None
    if "budget" in runs:
        try:
            fit2 = scaling_fit.fit_approach2(runs["budget"], runs["N"], runs["C"], runs["loss"])
        except ValueError as e:
            report["approach2_error"] = str(e)
    if fit2 is not None:
        report["approach2"] = {
            "a": fit2.a, "k_n": fit2.k_n, "b": fit2.b, "k_d": fit2.k_d,
            "minima": [{"budget": p.budget, "C": p.flops, "N_opt": p.n_opt, "D_opt": p.d_opt,
                        "loss_opt": p.loss_opt} for p in fit2.profiles]}
    try:
        fit3 = scaling_fit.fit_approach3(runs["N"], runs["D"], runs["loss"], grid=grid,
                                         bootstrap=bootstrap)
    except ValueError as e:
        report["approach3_error"] = str(e)
    if fit3 is not None:
        law = fit3.law
        report["approach3"] = {**law.params, "a": law.beta / (law.alpha + law.beta),
                               "b": law.alpha / (law.alpha + law.beta),
                               "huber_objective": fit3.objective, "bootstrap": bootstrap,
                               "intervals_95": fit3.intervals()}
    optimal = []
    for c in targets:
        row: dict[str, float] = {"C": c}
        if fit3 is not None:
            n, d = fit3.law.optimal_allocation(c)
            row.update(approach3_N=float(n), approach3_D=float(d),
                       approach3_loss=float(fit3.law.loss(n, d)))
        if fit2 is not None:
            n, d = fit2.optimal_allocation(c)
            row.update(approach2_N=float(n), approach2_D=float(d))
        optimal.append(row)
    report["compute_optimal"] = optimal
    plot_loss_vs_compute(os.path.join(out_dir, "loss_vs_compute.png"), runs, fit3, fit2)
    report["plots"] = [os.path.join(out_dir, "loss_vs_compute.png")]
    if fit2 is not None:
        plot_isoflop(os.path.join(out_dir, "isoflop.png"), fit2)
        report["plots"].append(os.path.join(out_dir, "isoflop.png"))
    with open(os.path.join(out_dir, "fit.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _RESULTS.value:
        raise app.UsageError("--results is required")
    runs = read_runs(_RESULTS.value, _N.value, _C.value, _D.value, _LOSS.value, _BUDGET.value,
                     _EXCLUDE.value)
    out_dir = _OUT_DIR.value or os.path.join(os.path.dirname(_RESULTS.value), "fit")
    grid = SMALL_GRID if _GRID.value == "small" else None
    report = fit_and_report(runs, out_dir, grid, _BOOTSTRAP.value,
                            [float(t) for t in _TARGETS.value])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(lambda argv: errors.run_main(main, argv))
