"""Scaling laws and their fits, in numpy alone (no SciPy dependency).

Two forms, fitted to the log of the loss (every run weighs the same whatever its loss):

  L(N, D) = E + A / N^alpha + B / D^beta      (Hoffmann et al. 2022, "Chinchilla")
  L(C)    = E + A / C^gamma                    (C = 6 N D training FLOPs)

N is the non-embedding parameter count, D the tokens trained. The positive constants are fitted
through their logs (E = exp(e), ...), so the search is unconstrained; Levenberg-Marquardt with an
analytic Jacobian, started from a small grid of exponents (the best end point wins: the
objective has flat valleys where a single start stops early).

With L(N, D) and a compute budget C = 6 N D, the loss is lowest at
  N_opt = G (C / 6)^(beta / (alpha + beta)),  G = (alpha A / (beta B))^(1 / (alpha + beta)),
  D_opt = C / (6 N_opt).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Fit:
    """A fitted law: its form, named parameters, and the fit's error on its own points."""

    form: str  # "N,D" or "C"
    params: dict[str, float]
    rms_log_error: float  # root mean square of log(predicted) - log(observed)
    max_rel_error: float  # the worst |predicted / observed - 1|
    points: int

    def predict(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        p = self.params
        if self.form == "C":
            return p["E"] + p["A"] / (6 * n * d) ** p["gamma"]
        return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]

    def describe(self) -> str:
        p = self.params
        if self.form == "C":
            law = f"L(C) = {p['E']:.4g} + {p['A']:.4g} / C^{p['gamma']:.4f}"
        else:
            law = (
                f"L(N, D) = {p['E']:.4g} + {p['A']:.4g} / N^{p['alpha']:.4f} + "
                f"{p['B']:.4g} / D^{p['beta']:.4f}"
            )
        return (
            f"{law}   ({self.points} runs; error: {100 * self.rms_log_error:.2f}% RMS, "
            f"{100 * self.max_rel_error:.2f}% worst)"
        )

    def optimum(self, flops: float) -> tuple[float, float] | None:
        """(N_opt, D_opt) for a budget of `flops` (L(N, D) only), or None."""
        if self.form == "C":
            return None
        p = self.params
        a, b = p["alpha"], p["beta"]
        g = (a * p["A"] / (b * p["B"])) ** (1 / (a + b))
        n = g * (flops / 6) ** (b / (a + b))
        return n, flops / (6 * n)


def _quiet(f: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
    """`f` with overflow silenced: a trial step far off gives inf and is simply rejected."""

    def wrapped(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return f(x)

    return wrapped


def _levenberg_marquardt(
    residual: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    x0: np.ndarray,
    iterations: int = 300,
) -> tuple[np.ndarray, float]:
    """Minimise sum(r^2) for `residual(x) -> (r, J)`; returns (x, cost)."""
    x, lam = x0.astype(np.float64), 1e-3
    residual = _quiet(residual)
    r, jac = residual(x)
    cost = float(r @ r)
    for _ in range(iterations):
        jtj, jtr = jac.T @ jac, jac.T @ r
        try:
            step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), -jtr)
        except np.linalg.LinAlgError:
            break
        candidate = x + step
        r2, jac2 = residual(candidate)
        cost2 = float(r2 @ r2)
        if np.isfinite(cost2) and cost2 < cost:
            done = cost - cost2 < 1e-14 * max(cost, 1e-30)
            x, r, jac, cost, lam = candidate, r2, jac2, cost2, max(lam / 3, 1e-9)
            if done or np.abs(step).max() < 1e-10:
                break
        else:
            lam *= 4
            if lam > 1e10:
                break
    return x, cost


def _finish(form: str, names: list[str], x: np.ndarray, pred: np.ndarray, loss: np.ndarray) -> Fit:
    values = {
        n: (float(np.exp(v)) if n in ("E", "A", "B") else float(v))
        for n, v in zip(names, x, strict=True)
    }
    log_err = np.log(pred) - np.log(loss)
    return Fit(
        form,
        values,
        float(np.sqrt(np.mean(log_err**2))),
        float(np.max(np.abs(pred / loss - 1))),
        len(loss),
    )


def fit_nd(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> Fit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to the points (needs >= 5 runs)."""
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    if len(loss) < 5:
        raise ValueError(f"L(N, D) has 5 parameters: it needs at least 5 runs, got {len(loss)}")
    ln, ld, target = np.log(n), np.log(d), np.log(loss)

    def residual(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e, a, alpha, b, beta = x
        t1, t2 = np.exp(a - alpha * ln), np.exp(b - beta * ld)
        pred = np.exp(e) + t1 + t2
        jac = np.stack(
            [np.exp(e) / pred, t1 / pred, -ln * t1 / pred, t2 / pred, -ld * t2 / pred], 1
        )
        return np.log(pred) - target, jac

    best = None
    floor = math.log(max(loss.min() * 0.5, 1e-6))
    for e0, alpha0, beta0 in itertools.product(
        (floor, math.log(loss.min() * 0.9)), (0.1, 0.3, 0.6), (0.1, 0.3, 0.6)
    ):
        a0 = math.log(max(loss.mean() - math.exp(e0), 1e-3) / 2) + alpha0 * ln.mean()
        b0 = math.log(max(loss.mean() - math.exp(e0), 1e-3) / 2) + beta0 * ld.mean()
        x, cost = _levenberg_marquardt(residual, np.array([e0, a0, alpha0, b0, beta0]))
        if best is None or cost < best[1]:
            best = (x, cost)
    x = best[0]
    pred = np.exp(_quiet(residual)(x)[0] + target)
    return _finish("N,D", ["E", "A", "alpha", "B", "beta"], x, pred, loss)


def fit_c(flops: np.ndarray, loss: np.ndarray) -> Fit:
    """Fit L(C) = E + A/C^gamma to the points (needs >= 3 runs)."""
    c, loss = np.asarray(flops, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if len(loss) < 3:
        raise ValueError(f"L(C) has 3 parameters: it needs at least 3 runs, got {len(loss)}")
    lc, target = np.log(c), np.log(loss)

    def residual(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e, a, gamma = x
        t = np.exp(a - gamma * lc)
        pred = np.exp(e) + t
        return np.log(pred) - target, np.stack([np.exp(e) / pred, t / pred, -lc * t / pred], 1)

    best = None
    for e0, g0 in itertools.product((math.log(loss.min() * 0.5), math.log(loss.min() * 0.9)),
                                    (0.05, 0.15, 0.4)):  # fmt: skip
        a0 = math.log(max(loss.mean() - math.exp(e0), 1e-3)) + g0 * lc.mean()
        x, cost = _levenberg_marquardt(residual, np.array([e0, a0, g0]))
        if best is None or cost < best[1]:
            best = (x, cost)
    x = best[0]
    pred = np.exp(_quiet(residual)(x)[0] + target)
    return _finish("C", ["E", "A", "gamma"], x, pred, loss)
