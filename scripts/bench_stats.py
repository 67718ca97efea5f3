"""Statistics the benchmark tools share (bench-tool.py, bench-sleep.py): nearest-rank
percentiles, medians, a distribution summary, and the met/not met verdict."""

import math


def pct(sorted_xs, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_xs:
        return float("nan")
    k = max(1, math.ceil(p / 100.0 * len(sorted_xs)))
    return sorted_xs[k - 1]


def median(xs):
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def summary(xs):
    s = sorted(xs)
    return {
        "n": len(s),
        "min": s[0] if s else float("nan"),
        "p50": median(s),
        "p90": pct(s, 90),
        "p99": pct(s, 99),
        "max": s[-1] if s else float("nan"),
    }


def verdict(ok):
    return "**met**" if ok else "**not met**"
