"""Calibration: are 90%-confident predictions right 90% of the time, and which temperature makes
them so?

    tally = Tally(); tally.add(stats)      # stats: the TokenStats of each scored chunk
    tally.nll, tally.bins.ece, tally.bins.mce, tally.bins.table()
    fit = fit_temperature(chunks)          # chunks(): a fresh iterator of (logits [n, V], targets [n])

ECE is top-label: a prediction's confidence is its largest probability, it is correct when that
argmax is the next token. Predictions fall into 15 equal-width bins (lo, hi]; ECE is the
count-weighted mean of |accuracy - mean confidence| over the bins, MCE its largest value over the
non-empty bins (Guo et al. 2017, "On Calibration of Modern Neural Networks").

Temperature scaling divides the logits by one T > 0 fitted to minimise NLL. NLL is convex in
beta = 1/T, so it has one minimum in log T; the fit is Newton's method on log T with the exact
first and second derivatives, kept inside a bracket that shrinks around the minimum (a bisection
step whenever Newton would leave it or slows down), so T stays positive and the fit always
converges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from minilm.evaluation.scoring import TokenStats

N_BINS = 15
T_MIN, T_MAX = 0.01, 100.0  # where the temperature fit looks


class ReliabilityBins:
    """Counts, summed confidence and summed correctness in n_bins equal-width bins (lo, hi]."""

    def __init__(self, n_bins: int = N_BINS):
        self.edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
        self.count = torch.zeros(n_bins, dtype=torch.float64)
        self.confidence = torch.zeros(n_bins, dtype=torch.float64)
        self.correct = torch.zeros(n_bins, dtype=torch.float64)

    def add(self, confidence: Tensor, correct: Tensor) -> None:
        conf = confidence.detach().double()
        # bucketize(right=False) gives i with edges[i-1] < x <= edges[i]: bin i - 1 is (lo, hi]
        idx = (torch.bucketize(conf, self.edges.to(conf.device)) - 1).clamp_(0, len(self.count) - 1)
        n = len(self.count)
        self.count += torch.bincount(idx, minlength=n).double().cpu()
        self.confidence += torch.bincount(idx, weights=conf, minlength=n).cpu()
        self.correct += torch.bincount(idx, weights=correct.double(), minlength=n).cpu()

    @property
    def ece(self) -> float:
        """sum over bins of count/N * |accuracy - confidence| = sum |correct - confidence| / N."""
        total = self.count.sum().item()
        return (self.correct - self.confidence).abs().sum().item() / total if total else math.nan

    @property
    def mce(self) -> float:
        used = self.count > 0
        if not used.any():
            return math.nan
        return ((self.correct[used] - self.confidence[used]).abs() / self.count[used]).max().item()

    def table(self) -> list[dict[str, Any]]:
        """One row per bin: lo, hi, count, accuracy and mean confidence (None when empty)."""
        rows = []
        for i, n in enumerate(self.count.tolist()):
            rows.append(dict(lo=self.edges[i].item(), hi=self.edges[i + 1].item(), count=int(n),
                             accuracy=self.correct[i].item() / n if n else None,
                             confidence=self.confidence[i].item() / n if n else None))
        return rows


class Tally:
    """Running sums over scored tokens: NLL, top-1/top-5 hits, entropy, top-1 probability and the
    reliability bins. Sums are float64, so a long corpus loses nothing to rounding."""

    def __init__(self, n_bins: int = N_BINS):
        self.tokens = 0
        self.nll_sum = self.entropy_sum = self.confidence_sum = 0.0
        self.top1 = self.top5 = 0
        self.bins = ReliabilityBins(n_bins)

    def add(self, stats: TokenStats) -> None:
        self.tokens += stats.logprobs.numel()
        self.nll_sum -= stats.logprobs.double().sum().item()
        self.entropy_sum += stats.entropy.double().sum().item()
        self.confidence_sum += stats.confidence.double().sum().item()
        self.top1 += int(stats.greedy.sum().item())
        self.top5 += int((stats.ranks <= 5).sum().item())
        self.bins.add(stats.confidence, stats.greedy)

    def _mean(self, total: float) -> float:
        return total / self.tokens if self.tokens else math.nan

    @property
    def nll(self) -> float:
        return self._mean(self.nll_sum)

    @property
    def entropy(self) -> float:
        return self._mean(self.entropy_sum)

    @property
    def top1_prob(self) -> float:
        return self._mean(self.confidence_sum)

    def figures(self) -> dict[str, float]:
        """top-1 / top-5 accuracy (the target is the argmax / has rank <= 5), mean entropy (nats),
        mean top-1 probability, ECE and MCE."""
        return dict(top1_acc=self._mean(self.top1), top5_acc=self._mean(self.top5),
                    entropy=self.entropy, top1_prob=self.top1_prob, ece=self.bins.ece,
                    mce=self.bins.mce)


# ---------------------------------------------------------------- temperature scaling

LogitChunks = Callable[[], Iterable[tuple[Tensor, Tensor]]]


@dataclass
class TemperatureFit:
    temperature: float
    nll_at_1: float  # mean NLL of the fitted tokens at T = 1
    nll: float  # ... at T = temperature
    tokens: int
    passes: int  # evaluations of the NLL and its derivatives (Newton steps + 1)
    at_bound: bool  # the minimum lies at (or beyond) T_MIN or T_MAX


def nll_and_derivatives(chunks: Iterable[tuple[Tensor, Tensor]], log_t: float
                        ) -> tuple[float, float, float, int]:
    """Summed NLL of the logits divided by T = e^u, with its first and second derivatives in u,
    in one pass over the chunks; and the token count. Sums, so that passes over parts of the
    tokens add up to the pass over all of them.

    With beta = 1/T: NLL = lse(beta z) - beta z_y, dNLL/dbeta = E[z] - z_y and
    d2NLL/dbeta2 = Var[z] (moments under softmax(beta z)); dbeta/du = -beta."""
    beta = math.exp(-log_t)
    f = g = h = 0.0
    n = 0
    for z, y in chunks:  # z [n, V], y [n]
        z = z.float()
        p = z * beta  # [n, V], turned into the probabilities in place
        lse = torch.logsumexp(p, dim=1)  # [n]
        p.sub_(lse[:, None]).exp_()
        mean_z = (p * z).sum(dim=1)
        var_z = (p * (z - mean_z[:, None]).square_()).sum(dim=1)
        z_y = z.gather(1, y[:, None])[:, 0]
        d_beta = (mean_z - z_y).double()
        f += (lse - beta * z_y).double().sum().item()
        g += (-beta * d_beta).sum().item()
        h += (beta * beta * var_z.double() + beta * d_beta).sum().item()
        n += y.numel()
    return f, g, h, n


def fit_temperature(chunks: LogitChunks, tol: float = 1e-6, max_passes: int = 60,
                    at_1: tuple[float, float, float, int] | None = None) -> TemperatureFit:
    """T* = argmin mean NLL(logits / T) over T in [T_MIN, T_MAX]: Newton's method on u = log T
    for the zero of dNLL/du, safeguarded as Numerical Recipes' rtsafe. `chunks()` must give a
    fresh pass over the same (logits, targets) each call.

    NLL is convex in 1/T, hence unimodal in u: the sign of its derivative says on which side of
    the minimum u lies, and [lo, hi] always holds it. A Newton step that would leave the bracket,
    or that does not at least halve the step before it (the slow crawl of Newton towards a
    minimum at T -> 0 or T -> inf), becomes a bisection; the first time a bisection heads for a
    search bound, the bound itself is tried, and a derivative of the same sign there ends the
    fit (the minimum lies beyond it, e.g. an untrained model's). Stops when a step moves u by
    < tol.

    at_1: nll_and_derivatives over all the chunks at T = 1, when the caller has it already
    (minilm.evaluation.corpus sums it chunk by chunk in its scoring pass): it counts as the first
    pass."""
    u_min, u_max = math.log(T_MIN), math.log(T_MAX)
    lo, hi, tried_lo, tried_hi = u_min, u_max, False, False
    u = 0.0
    f, g, h, n = at_1 if at_1 is not None else nll_and_derivatives(chunks(), u)
    if n == 0:
        raise ValueError("no tokens to fit a temperature on")
    f, g, h = f / n, g / n, h / n  # means over the n tokens
    nll_at_1, passes = f, 1
    step, last_step = hi - lo, hi - lo
    while passes < max_passes and g != 0:
        if (u <= u_min and g > 0) or (u >= u_max and g < 0):
            break  # the minimum lies beyond the search bound
        if g > 0:
            hi = u
        else:
            lo = u
        newton_leaves = ((u - hi) * h - g) * ((u - lo) * h - g) > 0  # u - g/h outside [lo, hi]
        if not newton_leaves and abs(2 * g) <= abs(last_step * h):
            new = u - g / h
        elif g < 0 and not tried_hi:
            new, tried_hi = u_max, True
        elif g > 0 and not tried_lo:
            new, tried_lo = u_min, True
        else:
            new = (lo + hi) / 2
        last_step, step = step, new - u
        u = new
        f, g, h = (total / n for total in nll_and_derivatives(chunks(), u)[:3])
        passes += 1
        if abs(step) < tol:
            break
    at_bound = min(u - u_min, u_max - u) < 1e-3
    return TemperatureFit(math.exp(u), nll_at_1, f, n, passes, at_bound)
