"""Percentiles of the benches' samples: interpolated (`pct`) and nearest-rank (`nearest_rank`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def pct(xs: Sequence[float], q: float) -> float:
    """The `q`-th percentile of `xs` (0 to 100, interpolated); NaN when there are none."""
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def nearest_rank(xs: Sequence[float], q: float) -> float:
    """The nearest-rank `q`-quantile of `xs` (0 to 1): the smallest sample with at least a
    fraction `q` of the samples at or below it. `xs` must not be empty."""
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
