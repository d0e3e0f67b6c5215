"""Statistics of a study: per-seed values summarised with 95 % t-intervals, paired comparisons
with t-test and exact sign-flip p-values, and Holm's correction across the metrics of a table.

Every experiment reports numbers through these functions, so "significant" means the same
thing everywhere:

* `Stat.of(values)`: mean, sample sd (ddof 1), standard error, and the two-sided 95 %
  t-interval mean ± t(0.975, n−1)·se over the finite values (NaN marks a missing seed).
* `paired(a, b)`: the per-seed differences a_i − b_i of two arms that share seeds (same
  initialisation and data order), their `Stat`, the two-sided one-sample t-test p-value of
  mean 0, and — with at least `SIGN_FLIP_MIN_N` pairs — the exact sign-flip (permutation)
  p-value: the share of the 2^n sign assignments whose |mean| is at least the observed one.
  The sign-flip test assumes only that differences are symmetric about 0 under the null, not
  normal; with fewer pairs its smallest possible p-value (2/2^n) is too coarse to be useful.
* `holm(p)`: Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1), which control
  the family-wise error rate over the metrics of one table. `with_holm` adjusts the t-tests
  (the decision: "differs" when below 0.05) and, separately, the sign-flip tests (a check
  without the normality assumption; with m metrics its smallest value is m·2/2^n, so it can
  only fall below 0.05 from about 8 seeds on).
* `parabola_fit(x, values)`: a least-squares parabola through a curve's seed means, the x where
  it is lowest on the studied range, and a bootstrap over seeds of that x.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

from scipy import stats as sps

CONFIDENCE = 0.95
SIGN_FLIP_MIN_N = 6
SIGN_FLIP_MAX_N = 20  # 2^20 sign assignments; beyond that a seeded Monte Carlo would be needed


def _json(v: float) -> float | None:
    """JSON has no NaN: undefined numbers are written as null."""
    return float(v) if math.isfinite(v) else None


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean, sample sd, standard error and 95 % t-interval of the finite values."""

    mean: float
    std: float
    n: int
    values: tuple[float, ...]
    se: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        vals = tuple(float("nan") if v is None else float(v) for v in values)
        finite = [v for v in vals if math.isfinite(v)]
        n = len(finite)
        mean = sum(finite) / n if n else float("nan")
        if n < 2:
            return cls(mean, float("nan"), n, vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
        se = std / math.sqrt(n)
        half = float(sps.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * se
        return cls(mean, std, n, vals, se, mean - half, mean + half)

    @property
    def missing(self) -> int:
        return len(self.values) - self.n

    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": _json(self.mean),
            "std": _json(self.std),
            "se": _json(self.se),
            "ci95": [_json(self.ci_low), _json(self.ci_high)],
            "n": self.n,
            "values": [_json(v) for v in self.values],
        }

    def format(self, digits: int = 2, unit: str = "", signed: bool = False) -> str:
        """`mean [low, high]unit`, or `mean unit (n=1)` without an interval, `—` if undefined."""
        return format_interval(self.mean, self.ci_low, self.ci_high, digits, unit, signed)


def format_interval(
    mean: float | None,
    low: float | None,
    high: float | None,
    digits: int = 2,
    unit: str = "",
    signed: bool = False,
) -> str:
    """One way to print a mean and its 95 % interval everywhere (terminal, report)."""
    mean = float("nan") if mean is None else float(mean)
    if not math.isfinite(mean):
        return "—"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(mean)
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" [{fmt.format(low)}, {fmt.format(high)}]"
    return text + unit


def format_range(values: list[float] | None, digits: int = 2, signed: bool = False) -> str:
    """A range [low, high] as `low…high`; "—" when there is none."""
    if not values:
        return "—"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{fmt.format(values[0])}…{fmt.format(values[1])}"


@dataclasses.dataclass(frozen=True)
class Paired:
    """Per-seed differences a − b with their interval and p-values. `p_holm` and
    `p_sign_flip_holm` are set by `with_holm` across a family of comparisons."""

    diff: Stat
    p_t: float
    p_sign_flip: float | None = None
    p_holm: float | None = None
    p_sign_flip_holm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        def opt(v: float | None) -> float | None:
            return None if v is None else _json(v)

        return {
            **self.diff.to_dict(),
            "p_t": _json(self.p_t),
            "p_sign_flip": opt(self.p_sign_flip),
            "p_holm": opt(self.p_holm),
            "p_sign_flip_holm": opt(self.p_sign_flip_holm),
        }


def t_test_p(diffs: Sequence[float]) -> float:
    """Two-sided one-sample t-test of mean 0 (NaN with fewer than 2 values or zero spread)."""
    d = [x for x in diffs if math.isfinite(x)]
    if len(d) < 2:
        return float("nan")
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    if sd == 0.0:
        return 0.0 if mean != 0.0 else 1.0
    t = mean / (sd / math.sqrt(len(d)))
    return float(2 * sps.t.sf(abs(t), len(d) - 1))


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Exact two-sided sign-flip p-value of mean 0: the share of all 2^n sign assignments whose
    |mean| is at least the observed |mean| (the observed assignment included)."""
    d = [x for x in diffs if math.isfinite(x)]
    n = len(d)
    if n == 0:
        return float("nan")
    if n > SIGN_FLIP_MAX_N:
        raise ValueError(f"exact sign-flip test enumerates 2^n assignments; n={n} is too many")
    observed = abs(sum(d)) * (1 - 1e-12)  # ties count as extreme, robust to rounding
    hits = sum(
        abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= observed
        for signs in itertools.product((1.0, -1.0), repeat=n)
    )
    return hits / 2**n


def paired(a: Sequence[float | None], b: Sequence[float | None]) -> Paired:
    """Compare two arms seed by seed: a[i] pairs with b[i]; a missing value drops the pair."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} vs {len(b)}")
    nan = float("nan")
    diffs = [
        (nan if x is None else float(x)) - (nan if y is None else float(y))
        for x, y in zip(a, b, strict=True)
    ]
    stat = Stat.of(diffs)
    finite = [x for x in diffs if math.isfinite(x)]
    flip = sign_flip_p(finite) if len(finite) >= SIGN_FLIP_MIN_N else None
    return Paired(stat, t_test_p(finite), flip)


@dataclasses.dataclass(frozen=True)
class ParabolaFit:
    """A parabola a·x² + b·x + c through a curve's seed means, and where it is lowest.

    `vertex` is −b/(2a) (NaN unless a > 0); `argmin` the x of the lowest fitted value on the
    studied range [min x, max x] (the vertex when it lies inside, else an end). The bootstrap
    resamples whole seeds (keeping each seed's values together, since curves are paired by
    seed), refits, and gives the 2.5 / 97.5 percentiles of `argmin`, the share of resamples
    whose parabola is convex, and the share whose vertex lies strictly inside the range.
    """

    coef: tuple[float, float, float]
    vertex: float
    argmin: float
    boot_low: float
    boot_high: float
    boot_convex: float
    boot_inside: float
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "coef": [_json(c) for c in self.coef],
            "vertex": _json(self.vertex),
            "argmin": _json(self.argmin),
            "argmin_ci95": [_json(self.boot_low), _json(self.boot_high)],
            "boot_convex": _json(self.boot_convex),
            "boot_inside": _json(self.boot_inside),
            "n_boot": self.n_boot,
        }


def _parabola(x: Sequence[float], y: Sequence[float]) -> tuple[tuple[float, float, float], float]:
    """(a, b, c) of the least-squares parabola and its argmin on [min x, max x]."""
    import numpy as np

    a, b, c = (float(v) for v in np.polyfit(np.asarray(x), np.asarray(y), 2))
    lo, hi = min(x), max(x)
    ends = [lo, hi] + ([-b / (2 * a)] if a > 0 and lo < -b / (2 * a) < hi else [])
    return (a, b, c), min(ends, key=lambda v: a * v * v + b * v + c)


def parabola_fit(
    x: Sequence[float], values_SX: Sequence[Sequence[float | None]], n_boot: int = 2000, seed=0
) -> ParabolaFit:
    """Fit a parabola to the seed means of a curve and bootstrap its minimum over seeds.

    values_SX[s][i] is seed s's value at x[i] (None or NaN: missing). Needs at least three
    distinct x; with fewer than two seeds the bootstrap interval is NaN. The resampling is
    seeded, so the result is deterministic.
    """
    import numpy as np

    if len(set(x)) < 3:
        raise ValueError(f"a parabola needs at least 3 distinct x, got {list(x)}")
    v_SX = np.array([[np.nan if v is None else float(v) for v in row] for row in values_SX])
    ok = ~np.isnan(v_SX).all(axis=0)
    xs = [float(xi) for xi, keep in zip(x, ok, strict=True) if keep]
    if len(set(xs)) < 3:
        nan = float("nan")
        return ParabolaFit((nan, nan, nan), nan, nan, nan, nan, nan, nan, 0)
    coef, argmin = _parabola(xs, np.nanmean(v_SX[:, ok], axis=0))
    a, b, _ = coef
    vertex = -b / (2 * a) if a > 0 else float("nan")
    n = v_SX.shape[0]
    minima, convex, inside = [], 0, 0
    if n >= 2:
        rng = np.random.default_rng(seed)
        lo, hi = min(xs), max(xs)
        for _ in range(n_boot):
            sample = v_SX[rng.integers(0, n, n)][:, ok]
            if np.isnan(sample).all(axis=0).any():
                continue
            (ab, bb, _), m = _parabola(xs, np.nanmean(sample, axis=0))
            minima.append(m)
            convex += ab > 0
            inside += ab > 0 and lo < -bb / (2 * ab) < hi
    if not minima:
        return ParabolaFit(coef, vertex, argmin, *(4 * [float("nan")]), 0)
    low, high = (float(q) for q in np.percentile(minima, [2.5, 97.5]))
    k = len(minima)
    return ParabolaFit(coef, vertex, argmin, low, high, convex / k, inside / k, k)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order (NaN stays NaN, not counted)."""
    idx = [i for i, p in enumerate(pvalues) if math.isfinite(p)]
    m = len(idx)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def with_holm(tests: dict[str, Paired]) -> dict[str, Paired]:
    """The same comparisons with Holm-adjusted p-values across the family `tests`: `p_holm` of
    the t-tests (the decision), `p_sign_flip_holm` of the sign-flip tests where every test has
    one (a check that does not assume normal differences)."""
    keys = list(tests)
    t_adj = holm([tests[k].p_t for k in keys])
    flips = [tests[k].p_sign_flip for k in keys]
    f_adj = holm(flips) if all(f is not None for f in flips) else [None] * len(keys)
    return {
        k: dataclasses.replace(tests[k], p_holm=t, p_sign_flip_holm=f)
        for k, t, f in zip(keys, t_adj, f_adj, strict=True)
    }
