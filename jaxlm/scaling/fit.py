"""Scaling-law fits to (N, D, C, loss) points: Chinchilla's Approaches 2 and 3.

Approach 2 (IsoFLOP profiles, Hoffmann et al. 2022, Sec. 3.2): for each compute budget, fit a
parabola to the loss as a function of log N; its vertex is that budget's loss-optimal N (and
D = C / 6N). Power laws N_opt = k_N C^a and D_opt = k_D C^b are least-squares lines in log-log.

Approach 3 (parametric loss, Sec. 3.3): L(N, D) = E + A / N^alpha + B / D^beta, fitted by
minimising the Huber loss (delta = 1e-3) between log L and the log of the prediction, written
as LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, with L-BFGS from
every start of a grid (the paper's grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ...,
1}, a, b in {0, 5, ..., 25}); the best final objective wins. Confidence intervals come from a
bootstrap over points, each resample refitted from the full-data optimum (Besiroglu et al. 2024,
"Chinchilla scaling: a replication attempt"). Under C = 6 N D the compute-optimal allocation is
N_opt(C) = G (C/6)^(beta/(alpha+beta)), D_opt(C) = (C/6)^(alpha/(alpha+beta)) / G with
G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3
PAPER_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}


@dataclasses.dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def optimal_allocation(self, flops: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising L(N, D) subject to 6 N D = flops."""
        c6 = np.asarray(flops, float) / 6.0
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return g * c6 ** (self.beta / s), c6 ** (self.alpha / s) / g

    def optimal_loss(self, flops: np.ndarray | float) -> np.ndarray:
        n, d = self.optimal_allocation(flops)
        return self.loss(n, d)

    @property
    def params(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def huber(residual: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Quadratic within +-delta, linear outside; continuous with a continuous derivative."""
    r = np.abs(residual)
    return np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Huber objective of theta = (a, b, e, alpha, beta) and its gradient."""
    a, b, e, alpha, beta = theta
    t_n, t_d = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t_n, t_d), e)
    w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    pred = top + np.log(total)  # log(A/N^alpha + B/D^beta + E), overflow-safe
    r = pred - log_loss
    dr = np.clip(r, -delta, delta) / total  # d huber / d r, times the softmax normaliser
    grad = np.array([np.sum(dr * w_n), np.sum(dr * w_d), np.sum(dr * w_e),
                     -np.sum(dr * w_n * log_n), -np.sum(dr * w_d * log_d)])
    return float(np.sum(huber(r, delta))), grad


def _law(theta: np.ndarray) -> LossLaw:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return LossLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha,
                   beta=beta)


def _minimize(theta0: Sequence[float], data: tuple[np.ndarray, ...],
              delta: float) -> optimize.OptimizeResult:
    # The objective is ~1e-3 with delta = 1e-3: scipy's default gtol (1e-5) would stop far from
    # the optimum, so the tolerances are tight.
    return optimize.minimize(_objective, np.asarray(theta0, float), args=(*data, delta),
                             jac=True, method="L-BFGS-B",
                             options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 2000})


@dataclasses.dataclass
class Approach3Fit:
    law: LossLaw
    objective: float
    theta: np.ndarray  # (a, b, e, alpha, beta) of the best start
    num_points: int
    bootstrap: list[LossLaw] = dataclasses.field(default_factory=list)

    def intervals(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
        """Percentile bootstrap intervals of E, A, B, alpha, beta and a = beta/(alpha+beta)."""
        if not self.bootstrap:
            return {}
        lo, hi = 50 * (1 - level), 50 * (1 + level)
        out = {}
        for key in ("E", "A", "B", "alpha", "beta"):
            values = np.array([law.params[key] for law in self.bootstrap])
            out[key] = (float(np.percentile(values, lo)), float(np.percentile(values, hi)))
        a = np.array([law.beta / (law.alpha + law.beta) for law in self.bootstrap])
        out["a"] = (float(np.percentile(a, lo)), float(np.percentile(a, hi)))
        return out


def _arrays(n: Iterable[float], d: Iterable[float], loss: Iterable[float]):
    n, d, loss = (np.asarray(list(x), float) for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)) or len(n) < 5:
        raise ValueError(f"Approach 3 needs >= 5 points of equal-length N, D, loss; got "
                         f"{len(n)}, {len(d)}, {len(loss)}")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
        raise ValueError("N, D and loss must be positive")
    return np.log(n), np.log(d), np.log(loss)


def fit_approach3(n: Iterable[float], d: Iterable[float], loss: Iterable[float], *,
                  grid: dict[str, Sequence[float]] | None = None, delta: float = HUBER_DELTA,
                  bootstrap: int = 0, seed: int = 0) -> Approach3Fit:
    """Fits L(N, D) = E + A/N^alpha + B/D^beta (see the module docstring).

    `grid` maps a, b, e, alpha, beta to their start values (default: the paper's grid, 4500
    starts); `bootstrap` resamples refit from the best start.
    """
    data = _arrays(n, d, loss)
    grid = PAPER_GRID if grid is None else grid
    best = None
    for a, b, e, alpha, beta in itertools.product(grid["a"], grid["b"], grid["e"],
                                                  grid["alpha"], grid["beta"]):
        result = _minimize((a, b, e, alpha, beta), data, delta)
        if np.isfinite(result.fun) and (best is None or result.fun < best.fun):
            best = result
    if best is None:
        raise RuntimeError("no start of the grid reached a finite objective")
    fit = Approach3Fit(law=_law(best.x), objective=float(best.fun), theta=best.x,
                       num_points=len(data[0]))
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        idx = rng.integers(0, len(data[0]), size=len(data[0]))
        result = _minimize(best.x, tuple(x[idx] for x in data), delta)
        fit.bootstrap.append(_law(result.x))
    return fit


@dataclasses.dataclass
class IsoFlopProfile:
    """One budget's parabola L = c0 + c1 x + c2 x^2 in x = log N, and its vertex."""

    budget: float
    flops: float  # mean 6ND of the budget's runs
    coeffs: tuple[float, float, float]
    n_opt: float
    d_opt: float
    loss_opt: float
    n: np.ndarray
    loss: np.ndarray


@dataclasses.dataclass
class Approach2Fit:
    profiles: list[IsoFlopProfile]
    a: float  # N_opt = k_n C^a
    k_n: float
    b: float  # D_opt = k_d C^b
    k_d: float

    def optimal_allocation(self, flops: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(flops, float)
        return self.k_n * c**self.a, self.k_d * c**self.b


def isoflop_profile(budget: float, n: np.ndarray, flops: np.ndarray,
                    loss: np.ndarray) -> IsoFlopProfile | None:
    """The parabola of one budget; None when it has < 3 sizes or no minimum (opens down)."""
    if len(np.unique(n)) < 3:
        return None
    c2, c1, c0 = np.polyfit(np.log(n), loss, 2)
    if c2 <= 0:
        return None
    x = -c1 / (2 * c2)
    c = float(np.mean(flops))
    n_opt = float(np.exp(x))
    return IsoFlopProfile(budget=float(budget), flops=c, coeffs=(float(c0), float(c1),
                                                                 float(c2)),
                          n_opt=n_opt, d_opt=c / (6 * n_opt), loss_opt=float(c0 + c1 * x +
                                                                                c2 * x * x),
                          n=np.asarray(n, float), loss=np.asarray(loss, float))


def fit_approach2(budget: Iterable[float], n: Iterable[float], flops: Iterable[float],
                  loss: Iterable[float]) -> Approach2Fit:
    """IsoFLOP minima per budget (points grouped by equal `budget` labels) and their power laws.

    `flops` are the runs' actual 6ND (a run's D is rounded to whole steps); a budget's C is
    their mean. Budgets whose parabola has no minimum are left out; at least 2 must remain.
    """
    budget, n, flops, loss = (np.asarray(list(x), float) for x in (budget, n, flops, loss))
    profiles = []
    for value in np.unique(budget):
        sel = budget == value
        profile = isoflop_profile(value, n[sel], flops[sel], loss[sel])
        if profile is not None:
            profiles.append(profile)
    if len(profiles) < 2:
        raise ValueError(f"Approach 2 needs >= 2 budgets with >= 3 sizes and a loss minimum; "
                         f"got {len(profiles)} of {len(np.unique(budget))}")
    log_c = np.log([p.flops for p in profiles])
    a, log_kn = np.polyfit(log_c, np.log([p.n_opt for p in profiles]), 1)
    b, log_kd = np.polyfit(log_c, np.log([p.d_opt for p in profiles]), 1)
    return Approach2Fit(profiles=profiles, a=float(a), k_n=float(np.exp(log_kn)), b=float(b),
                        k_d=float(np.exp(log_kd)))
