"""Confidence intervals for evaluation numbers (accuracies, rewards, paired comparisons).

Functions (no SciPy needed; the Student t quantile is computed here):
- `wilson_interval(k, n)`: a success rate k/n (accuracy, pass rate) -> Wilson score interval.
- `mean_interval(values)`: a mean of real-valued outcomes (rewards) -> Student t interval.
- `paired_difference(a, b)`: two policies scored on the same tasks (a[i], b[i] are task i's
  outcomes) -> the mean difference a - b and its t interval over the per-task differences
  (the paired t interval: task difficulty cancels, so it is much narrower than comparing two
  independent intervals). Identical outcomes give a zero difference with zero width.
Each returns an `Interval`; `str(interval)` reads `0.31 [0.20, 0.45], n=16` (differences are
signed: `+0.09 [+0.04, +0.14], n=400`).

Metric-name convention (read by `python -m marl_llm.report`): an evaluation scalar
`eval/<name>` may carry its interval as `eval/<name>/ci_low` and `eval/<name>/ci_high` (same
scale as the point, `conf` 0.95) and its sample size as `eval/<name>/n`;
`interval_metrics("eval/acc", iv)` builds exactly these keys and `interval_from_metrics` reads
them back. The report draws the interval when both bounds are present (the point alone
otherwise) and prints it in its summary table as `0.312 [0.142, 0.556], n=16`. A paired
difference a - b is named `diff/<a>-<b>` (`diff_key`); `read_intervals`, `differences` and
`comparison_lines` read it back (run summaries and `python -m marl_llm.evaluate` print the
differences as lines).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Mapping, Optional, Sequence

CI_LOW, CI_HIGH, CI_N = "ci_low", "ci_high", "n"


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: Optional[int]      # None: not known (an interval read back from metrics without its /n)
    signed: bool = False  # a difference: print with an explicit sign

    def format(self, digits: int = 2) -> str:
        f = f"{{:{'+' if self.signed else ''}.{digits}f}}".format
        bounds = f"[{f(self.low)}, {f(self.high)}]" if not math.isnan(self.low) else "[no interval]"
        return f"{f(self.estimate)} {bounds}" + (f", n={self.n}" if self.n is not None else "")

    def __str__(self) -> str:
        return self.format()


def _check_conf(conf: float) -> None:
    if not 0 < conf < 1:
        raise ValueError(f"conf={conf!r} must be in (0, 1), e.g. 0.95")


def z_quantile(conf: float) -> float:
    """The two-sided standard normal quantile: 1.96 for conf=0.95."""
    _check_conf(conf)
    return NormalDist().inv_cdf((1 + conf) / 2)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(conf: float, df: float) -> float:
    """The two-sided Student t quantile: 12.706 for conf=0.95, df=1; 2.228 for df=10."""
    _check_conf(conf)
    if df <= 0:
        raise ValueError(f"df={df!r} must be > 0")
    target = (1 + conf) / 2
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < target:  # bracket, then bisect: t_cdf is monotone
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < target else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def wilson_interval(k: int, n: int, conf: float = 0.95) -> Interval:
    """Wilson score interval for k successes in n trials (stays inside [0, 1] and is sensible
    at k=0 or k=n, unlike the normal approximation)."""
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise ValueError(f"wilson_interval needs integer counts, got k={k!r}, n={n!r}")
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n and n > 0, got k={k!r}, n={n!r}")
    z = z_quantile(conf)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k=0 / k=n the bound is exactly 0 / 1; rounding must not push it past
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), int(n))


def _values(name: str, values: Sequence[float]) -> list[float]:
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError(f"{name} needs at least one value")
    bad = [v for v in xs if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name} got non-finite values {bad[:3]}")
    return xs


def _t_interval(xs: list[float], conf: float, signed: bool) -> Interval:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:  # one observation: no spread to estimate
        _check_conf(conf)
        return Interval(m, float("nan"), float("nan"), n, signed)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = t_quantile(conf, n - 1) * sd / math.sqrt(n)
    return Interval(m, m - half, m + half, n, signed)


def mean_interval(values: Sequence[float], conf: float = 0.95) -> Interval:
    """Mean of real-valued outcomes (e.g. per-task rewards) with a Student t interval (n-1 degrees
    of freedom; close to the normal interval for large n). One value: no interval (nan bounds)."""
    return _t_interval(_values("mean_interval", values), conf, signed=False)


def paired_difference(a: Sequence[float], b: Sequence[float], conf: float = 0.95) -> Interval:
    """Mean of a[i] - b[i] over tasks scored by both policies, with the paired t interval."""
    xa, xb = _values("paired_difference(a)", a), _values("paired_difference(b)", b)
    if len(xa) != len(xb):
        raise ValueError(f"paired_difference needs outcomes on the same tasks: len(a)={len(xa)} != len(b)={len(xb)}")
    return _t_interval([x - y for x, y in zip(xa, xb)], conf, signed=True)


def interval_metrics(key: str, iv: Interval) -> dict[str, float]:
    """The scalars that carry `iv` for the metric `key` (see the module docstring)."""
    out = {key: iv.estimate, f"{key}/{CI_LOW}": iv.low, f"{key}/{CI_HIGH}": iv.high}
    if iv.n is not None:
        out[f"{key}/{CI_N}"] = iv.n
    return out


def interval_from_metrics(metrics: Mapping[str, Any], key: str) -> Optional[Interval]:
    """The interval `interval_metrics` stored for `key` in `metrics`, None if it has none."""
    if key not in metrics or f"{key}/{CI_LOW}" not in metrics or f"{key}/{CI_HIGH}" not in metrics:
        return None
    n = metrics.get(f"{key}/{CI_N}")
    return Interval(metrics[key], metrics[f"{key}/{CI_LOW}"], metrics[f"{key}/{CI_HIGH}"],
                    None if n is None else int(n))


# ---- reading the convention back (run summaries, `python -m marl_llm.evaluate`) ----------------
DIFF = "diff"


def diff_key(a: str, b: str) -> str:
    """The metric name of the paired difference a - b of two metrics scored on the same tasks:
    `diff/<a>-<b>`. Names must not contain '-', so the key reads back as "a - b" unambiguously."""
    bad = [x for x in (a, b) if "-" in x or not x]
    if bad:
        raise ValueError(f"metric names in a paired difference must be non-empty and free of '-': {bad}")
    return f"{DIFF}/{a}-{b}"


def read_intervals(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Interval]:
    """Every metric `<prefix><name>` of `metrics` that carries its interval and n by the
    convention above, as name -> Interval (differences, `diff/...`, signed), in key order."""
    out = {}
    for key, value in metrics.items():
        if not key.startswith(prefix) or key.rsplit("/", 1)[-1] in (CI_LOW, CI_HIGH, CI_N):
            continue
        iv = interval_from_metrics(metrics, key)
        if iv is None or iv.n is None:
            continue
        name = key[len(prefix):]
        out[name] = Interval(float(iv.estimate), float(iv.low), float(iv.high), iv.n,
                             signed=name.startswith(f"{DIFF}/"))
    return out


def diff_pair(name: str) -> Optional[tuple[str, str]]:
    """(a, b) of a paired difference's name `diff/<a>-<b>` (`diff_key`: metric names hold no '-',
    so the first '-' splits; they may hold '/'); None for any other name, including the
    difference's own `/ci_low`, `/ci_high`, `/n`."""
    if not name.startswith(f"{DIFF}/") or name.rsplit("/", 1)[-1] in (CI_LOW, CI_HIGH, CI_N) or "-" not in name:
        return None
    a, b = name[len(DIFF) + 1:].split("-", 1)
    return a, b


def differences(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str, Interval]]:
    """(a, b, interval of a - b) for every paired difference `diff/<a>-<b>` in `metrics`."""
    return [(*pair, iv) for name, iv in read_intervals(metrics, prefix).items() if (pair := diff_pair(name))]


def comparison_lines(metrics: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One line per paired difference in `metrics`: `a - b = +0.09 [+0.04, +0.14], n=400`."""
    return [f"{a} - {b} = {iv}" for a, b, iv in differences(metrics, prefix)]
