"""Scaling-law fits: Approach 3 on Chinchilla's published points, Approach 2 on a known law."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from jaxlm.scaling import fit as scaling_fit

ROOT = Path(__file__).resolve().parents[1]
# 245 (N, C, loss) points read off Chinchilla's Figure 4 by Besiroglu et al. (2024),
# github.com/epoch-research/analyzing-chinchilla data/svg_extracted_data.csv (3 columns kept).
FIG4 = ROOT / "tests" / "data" / "chinchilla_fig4_points.csv"
KNOWN = scaling_fit.LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _tool():
    return importlib.import_module("jaxlm.tools.fit_scaling_law")


def test_objective_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    log_n, log_d = rng.uniform(17, 24, 50), rng.uniform(20, 26, 50)
    log_loss = np.log(KNOWN.loss(np.exp(log_n), np.exp(log_d))) + rng.normal(0, 2e-3, 50)
    theta = np.array([6.2, 5.9, 0.4, 0.31, 0.3])
    _, grad = scaling_fit._objective(theta, log_n, log_d, log_loss, 1e-3)
    for i in range(5):
        step = np.zeros(5)
        step[i] = 1e-6
        up = scaling_fit._objective(theta + step, log_n, log_d, log_loss, 1e-3)[0]
        down = scaling_fit._objective(theta - step, log_n, log_d, log_loss, 1e-3)[0]
        assert grad[i] == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-9)
    assert scaling_fit.huber(np.array([5e-4, -2e-3])).tolist() == pytest.approx(
        [0.5 * 5e-4**2, 1e-3 * (2e-3 - 0.5e-3)])


def test_approach3_reproduces_the_chinchilla_replication_fit():
    """Besiroglu et al. (2024): E 1.82, A 482, B 2085, alpha 0.35, beta 0.37 (5 highest-loss
    points left out, as they do)."""
    tool = _tool()
    runs = tool.read_runs(str(FIG4), "Model Size", "Training FLOP", "D", "loss", "budget",
                          exclude_highest_loss=5)
    assert len(runs["N"]) == 240 and "budget" not in runs
    np.testing.assert_allclose(runs["D"], runs["C"] / (6 * runs["N"]))
    grid = {"a": [5.0, 10.0], "b": [5.0, 10.0], "e": [0.5], "alpha": [0.5], "beta": [0.5]}
    fit = scaling_fit.fit_approach3(runs["N"], runs["D"], runs["loss"], grid=grid,
                                    bootstrap=2)
    law = fit.law
    assert law.E == pytest.approx(1.82, abs=0.03)
    assert law.A == pytest.approx(482, rel=0.1)
    assert law.B == pytest.approx(2085, rel=0.1)
    assert law.alpha == pytest.approx(0.348, abs=0.01)
    assert law.beta == pytest.approx(0.366, abs=0.01)
    assert len(fit.bootstrap) == 2 and set(fit.intervals()) == {"E", "A", "B", "alpha",
                                                                "beta", "a"}
    # Compute-optimal allocation: minimal loss on the 6ND = C line, N_opt ~ C^(beta/(a+b)).
    c = 5.76e23  # Gopher's budget
    n, d = law.optimal_allocation(c)
    assert 6 * n * d == pytest.approx(c)
    for factor in (0.8, 1.25):
        assert law.loss(n * factor, d / factor) > law.loss(n, d)
    n2, _ = law.optimal_allocation(10 * c)
    assert np.log(n2 / n) / np.log(10) == pytest.approx(law.beta / (law.alpha + law.beta))


def test_approach3_recovers_a_known_law_from_noiseless_points():
    n = np.repeat(np.logspace(7, 10, 8), 6)
    d = np.tile(np.logspace(9, 12, 6), 8)
    fit = scaling_fit.fit_approach3(n, d, KNOWN.loss(n, d), grid={
        "a": [5.0], "b": [5.0], "e": [0.5], "alpha": [0.5], "beta": [0.5]})
    for key, value in KNOWN.params.items():
        assert fit.law.params[key] == pytest.approx(value, rel=1e-3), key


def _isoflop_grid(law, budgets, points=9, spread=1.5):
    """Runs of each budget at sizes spread log-uniformly around the law's own optimum."""
    rows = []
    for c in budgets:
        n_opt, _ = law.optimal_allocation(c)
        for n in n_opt * np.exp(np.linspace(-spread, spread, points)):
            rows.append((c, n, c, float(law.loss(n, c / (6 * n)))))
    return [np.array(x) for x in zip(*rows)]


def test_approach2_recovers_the_exponents_of_a_known_law():
    budgets = np.logspace(18, 22, 5)
    budget, n, flops, loss = _isoflop_grid(KNOWN, budgets)
    fit = scaling_fit.fit_approach2(budget, n, flops, loss)
    a_true = KNOWN.beta / (KNOWN.alpha + KNOWN.beta)
    assert fit.a == pytest.approx(a_true, abs=0.01)
    assert fit.b == pytest.approx(1 - a_true, abs=0.01)
    assert fit.a + fit.b == pytest.approx(1.0, abs=1e-9)  # D_opt = C / 6 N_opt
    for p in fit.profiles:  # each vertex is near that budget's true optimum
        n_opt, _ = KNOWN.optimal_allocation(p.flops)
        assert p.n_opt == pytest.approx(n_opt, rel=0.15)
        assert p.loss_opt == pytest.approx(float(KNOWN.optimal_loss(p.flops)), rel=2e-3)


def test_approach2_needs_curves_with_a_minimum():
    with pytest.raises(ValueError, match="Approach 2 needs"):
        scaling_fit.fit_approach2([1, 1, 1], [1, 2, 3], [1, 1, 1], [3.0, 2.0, 1.0])


def test_tool_writes_fit_and_plots(tmp_path):
    budget, n, flops, loss = _isoflop_grid(KNOWN, np.logspace(18, 20, 3), points=5)
    results = tmp_path / "results.csv"
    with open(results, "w") as f:
        f.write("name,budget,N,D,C,eval_loss\n")
        for i, (b, nn, c, ll) in enumerate(zip(budget, n, flops, loss)):
            f.write(f"p{i},{b},{nn},{c / (6 * nn)},{c},{ll}\n")
    tool = _tool()
    runs = tool.read_runs(str(results), "N", "C", "D", "eval_loss", "budget")
    report = tool.fit_and_report(runs, str(tmp_path / "fit"), tool.SMALL_GRID, 0, [1e21])
    saved = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert saved["approach3"]["alpha"] == pytest.approx(KNOWN.alpha, rel=0.02)
    assert saved["approach2"]["a"] == pytest.approx(report["approach2"]["a"])
    optimum = saved["compute_optimal"][0]
    n_true, d_true = KNOWN.optimal_allocation(1e21)
    assert optimum["approach3_N"] == pytest.approx(n_true, rel=0.1)
    assert optimum["approach2_N"] == pytest.approx(n_true, rel=0.2)
    for name in ("loss_vs_compute.png", "isoflop.png"):
        assert (tmp_path / "fit" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
