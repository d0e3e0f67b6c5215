"""IsoFLOP fits (Chinchilla's approach 2) and their bootstrap.

At one compute budget C every model size N is trained on D = C / (FLOPs per token) tokens; the
final loss against x = ln N is fitted with a parabola, whose minimum gives the compute-optimal
size N_opt(C) and loss L_opt(C). The same points against ln D give D_opt(C). Across budgets,
straight lines through (ln C, ln N_opt) and (ln C, ln D_opt) give the exponents of
N_opt ∝ C^a and D_opt ∝ C^b. With FLOPs per token exactly 6N, a + b = 1; with attention and
output-head FLOPs (counted here, large for small models) they need not sum to 1.

The minimum is taken over the sampled range of the budget's sizes: a convex parabola whose
vertex lies outside the range, or a concave one, gives an edge of the range and `interior =
False` — the optimum is then not bracketed by the grid and the exponent is not trustworthy.

Bootstrap (`bootstrap_isoflop`): every resample redraws the seeds and the fit points'
residuals and refits everything; intervals are percentiles of the resampled exponents. All
fits of all resamples run as batched least squares. The fit points' residuals are resampled
rather than the points themselves (a fixed design: the sizes are chosen, not sampled); in
simulated studies resampling the points gave intervals several times wider that covered more
often than nominal (docs/study-isoflop.md has the coverage of this form). The error of the
parabola over a given grid is not part of it; `leave_one_size_out` shows its size.

Shapes: B budgets, I sizes per budget, S seeds, R resamples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95
MIN_SIZES = 3


@dataclasses.dataclass(frozen=True)
class IsoFlopPoints:
    """The runs of one group (e.g. one modality and architecture).

    budgets_B: compute budget of each IsoFLOP curve (FLOPs); params_BI: model size N of each
    point; tokens_BI: training tokens D; loss_BIS: final loss of every seed (finite)."""

    budgets_B: np.ndarray
    params_BI: np.ndarray
    tokens_BI: np.ndarray
    loss_BIS: np.ndarray

    def __post_init__(self) -> None:
        b, i, s = self.loss_BIS.shape
        if self.budgets_B.shape != (b,) or self.params_BI.shape != (b, i):
            raise ValueError("budgets_B, params_BI and loss_BIS disagree in shape")
        if self.tokens_BI.shape != (b, i):
            raise ValueError("tokens_BI and loss_BIS disagree in shape")
        if i < MIN_SIZES:
            raise ValueError(f"a parabola needs >= {MIN_SIZES} sizes per budget")
        if not np.isfinite(self.loss_BIS).all():
            raise ValueError("every point needs a finite loss for every seed")

    @classmethod
    def of(
        cls,
        budgets: Sequence[float],
        params: Sequence[Sequence[float]],
        tokens: Sequence[Sequence[float]],
        loss: Sequence[Sequence[Sequence[float]]],
    ) -> IsoFlopPoints:
        return cls(*(np.asarray(v, dtype=float) for v in (budgets, params, tokens, loss)))


# ----------------------------------------------------------------------------- batched fits


def fit_parabolas(x_I: np.ndarray, y_RI: np.ndarray) -> np.ndarray:
    """Least-squares parabolas y = c0 + c1·u + c2·u², one per row of y_RI, all at the same
    abscissae x_I (at least three distinct), in the centred, scaled coordinate
    u = (x − centre) / scale of `_frame`: coef_R3."""
    centre, scale = _frame(x_I)
    u_I = (x_I - centre) / scale
    basis_I3 = np.stack([np.ones_like(u_I), u_I, u_I**2], axis=-1)
    coef_3R, *_ = np.linalg.lstsq(basis_I3, y_RI.T, rcond=None)
    return coef_3R.T


def _frame(x_I: np.ndarray) -> tuple[float, float]:
    """Centre and half-range of the abscissae: keeps the normal equations well conditioned."""
    lo, hi = float(np.min(x_I)), float(np.max(x_I))
    return (lo + hi) / 2, max((hi - lo) / 2, 1e-12)


def parabola_minima(
    x_I: np.ndarray, coef_R3: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_opt_R, y_opt_R, interior_R): the minimum of each parabola over [min x, max x].

    A convex parabola's vertex inside the range is `interior`; otherwise the minimum is the
    lower end point of the range (the grid does not bracket the optimum)."""
    centre, scale = _frame(x_I)
    c0, c1, c2 = coef_R3[:, 0], coef_R3[:, 1], coef_R3[:, 2]
    convex = c2 > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.where(convex, -c1 / (2 * np.where(convex, c2, 1.0)), np.inf)
    interior = convex & (vertex > -1.0) & (vertex < 1.0)

    def value(u: np.ndarray) -> np.ndarray:
        return c0 + c1 * u + c2 * u**2

    ends = np.where(value(-np.ones_like(c0)) <= value(np.ones_like(c0)), -1.0, 1.0)
    u_opt = np.where(interior, vertex, ends)
    return centre + scale * u_opt, value(u_opt), interior


def fit_lines(x_B: np.ndarray, y_RB: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ordinary least-squares lines y = slope·x + intercept, one per row: (slope_R, intercept_R)."""
    xc_B = x_B - x_B.mean()
    slope = (y_RB - y_RB.mean(axis=1, keepdims=True)) @ xc_B / (xc_B @ xc_B)
    return slope, y_RB.mean(axis=1) - slope * x_B.mean()


# ----------------------------------------------------------------------------- one group


def _optima(
    x_BI: np.ndarray, y_RBI: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per budget: (x_opt_RB, y_opt_RB, interior_RB, coef_RB3)."""
    r, b, _ = y_RBI.shape
    x_opt, y_opt, interior = np.empty((r, b)), np.empty((r, b)), np.empty((r, b), dtype=bool)
    coef = np.empty((r, b, 3))
    for k in range(b):
        coef[:, k] = fit_parabolas(x_BI[k], y_RBI[:, k])
        x_opt[:, k], y_opt[:, k], interior[:, k] = parabola_minima(x_BI[k], coef[:, k])
    return x_opt, y_opt, interior, coef


def _fit_group(
    points: IsoFlopPoints, y_n_RBI: np.ndarray, y_d_RBI: np.ndarray
) -> dict[str, np.ndarray]:
    """Everything fitted from R versions of one group's losses: y_n against ln N, y_d against
    ln D (the same values for the point estimate; resampled separately in the bootstrap)."""
    log_c = np.log(points.budgets_B)
    n_opt, l_opt, n_interior, n_coef = _optima(np.log(points.params_BI), y_n_RBI)
    d_opt, _, d_interior, d_coef = _optima(np.log(points.tokens_BI), y_d_RBI)
    a, a0 = fit_lines(log_c, n_opt)
    b, b0 = fit_lines(log_c, d_opt)
    return {
        "a": a,
        "a_intercept": a0,
        "b": b,
        "b_intercept": b0,
        "log_n_opt": n_opt,
        "log_d_opt": d_opt,
        "loss_opt": l_opt,
        "interior_n": n_interior,
        "interior_d": d_interior,
        "coef_n": n_coef,
        "coef_d": d_coef,
    }


def isoflop_fit(points: IsoFlopPoints) -> dict[str, Any]:
    """The point estimate: seed-mean losses, every size once.

    Returns `a`, `b` (exponents), their intercepts (ln N_opt = a·ln C + a_intercept), and per
    budget `n_opt`, `d_opt`, `loss_opt`, `interior_n`, `interior_d` and the parabolas
    (`parabola_n`, `parabola_d`: coefficients in the centred coordinate, with `centre`, `scale`
    of ln N or ln D — `parabola_value` evaluates them)."""
    y = points.loss_BIS.mean(axis=2)[None]
    fit = _fit_group(points, y, y)
    per_budget = []
    for k, budget in enumerate(points.budgets_B):
        frames = {
            key: _frame(np.log(grid[k]))
            for key, grid in (("n", points.params_BI), ("d", points.tokens_BI))
        }
        per_budget.append(
            {
                "budget": float(budget),
                "n_opt": float(np.exp(fit["log_n_opt"][0, k])),
                "d_opt": float(np.exp(fit["log_d_opt"][0, k])),
                "loss_opt": float(fit["loss_opt"][0, k]),
                "interior_n": bool(fit["interior_n"][0, k]),
                "interior_d": bool(fit["interior_d"][0, k]),
                **{
                    f"parabola_{key}": {
                        "coef": [float(c) for c in fit[f"coef_{key}"][0, k]],
                        "centre": frames[key][0],
                        "scale": frames[key][1],
                    }
                    for key in ("n", "d")
                },
            }
        )
    return {
        "a": float(fit["a"][0]),
        "a_intercept": float(fit["a_intercept"][0]),
        "b": float(fit["b"][0]),
        "b_intercept": float(fit["b_intercept"][0]),
        "budgets": per_budget,
        "bracketed": all(p["interior_n"] and p["interior_d"] for p in per_budget),
    }


def leave_one_size_out(points: IsoFlopPoints) -> list[dict[str, float]]:
    """`a` and `b` refitted with the i-th size (the i-th smallest N at every budget) left out,
    one entry per size; empty when fewer than `MIN_SIZES` sizes would remain.

    Their spread is the error of approximating each budget's curve by a parabola over this
    particular grid. The bootstrap keeps the grid, so its intervals do not include it."""
    n_sizes = points.loss_BIS.shape[1]
    if n_sizes - 1 < MIN_SIZES:
        return []
    out = []
    for drop in range(n_sizes):
        keep = [i for i in range(n_sizes) if i != drop]
        fit = isoflop_fit(
            IsoFlopPoints(
                points.budgets_B,
                points.params_BI[:, keep],
                points.tokens_BI[:, keep],
                points.loss_BIS[:, keep],
            )
        )
        out.append({"a": fit["a"], "b": fit["b"]})
    return out


def parabola_value(parabola: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """A fitted parabola (`isoflop_fit`'s `parabola_n`/`parabola_d`) at ln N (or ln D) = x."""
    c0, c1, c2 = parabola["coef"]
    u = (np.asarray(x, dtype=float) - parabola["centre"]) / parabola["scale"]
    return c0 + c1 * u + c2 * u**2


# ----------------------------------------------------------------------------- bootstrap


def _residual_draws(
    rng: np.random.Generator, x_BI: np.ndarray, y_BI: np.ndarray, resamples: int
) -> np.ndarray:
    """e_RBI: per budget, the residuals of the point-estimate parabola, drawn with replacement
    and scaled by √(I / (I − 3)) (a parabola's three coefficients absorb part of the noise)."""
    n_budgets, n_sizes = y_BI.shape
    inflate = np.sqrt(n_sizes / (n_sizes - 3)) if n_sizes > 3 else 0.0
    out = np.empty((resamples, n_budgets, n_sizes))
    for k in range(n_budgets):
        coef = fit_parabolas(x_BI[k], y_BI[k][None])
        fitted = _values(x_BI[k], coef)[0]
        out[:, k] = rng.choice((y_BI[k] - fitted) * inflate, size=(resamples, n_sizes))
    return out


def _values(x_I: np.ndarray, coef_R3: np.ndarray) -> np.ndarray:
    centre, scale = _frame(x_I)
    u_I = (x_I - centre) / scale
    return coef_R3[:, :1] + coef_R3[:, 1:2] * u_I + coef_R3[:, 2:] * u_I**2


def bootstrap_isoflop(
    groups: Mapping[Any, IsoFlopPoints], resamples: int, seed: int
) -> dict[Any, dict[str, np.ndarray]]:
    """Resampled fits of every group: group → `_fit_group` arrays of R = `resamples` rows
    (`a`, `b`, `log_n_opt`, …). Same seed, same result.

    Each resample (1) redraws the seeds with replacement, once for all groups — seed s shares
    its initialisation and data order across modalities and arms, so differences between
    groups stay paired — and averages each point's loss over the drawn seeds; and (2) adds to
    every fit point a residual of its budget's point-estimate parabola, drawn with replacement
    (the residual bootstrap of a fixed design: the sizes are chosen, not sampled, so their
    residuals are resampled rather than the points themselves). With one seed only (2) varies.
    """
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    seeds = {g.loss_BIS.shape[2] for g in groups.values()}
    if len(seeds) != 1:
        raise ValueError("every group needs the same seeds (they are resampled jointly)")
    (n_seeds,) = seeds
    rng = np.random.default_rng(seed)
    seed_w_RS = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=resamples)
    out = {}
    for key, points in groups.items():
        y_RBI = np.einsum("rs,bis->rbi", seed_w_RS, points.loss_BIS) / n_seeds
        mean_BI = points.loss_BIS.mean(axis=2)
        x_n, x_d = np.log(points.params_BI), np.log(points.tokens_BI)
        e_n = _residual_draws(rng, x_n, mean_BI, resamples)
        e_d = _residual_draws(rng, x_d, mean_BI, resamples)
        out[key] = _fit_group(points, y_RBI + e_n, y_RBI + e_d)
    return out


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central `confidence` percentile interval of bootstrap samples."""
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(np.asarray(samples, dtype=float), [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_stat(estimate: float, samples: np.ndarray) -> dict[str, Any]:
    """A point estimate with its bootstrap sd and 95 % percentile interval (JSON-ready)."""
    samples = np.asarray(samples, dtype=float)
    low, high = percentile_interval(samples)
    return {
        "estimate": float(estimate),
        "sd": float(samples.std(ddof=1)) if samples.size > 1 else float("nan"),
        "ci95": [low, high],
        "resamples": int(samples.size),
    }
