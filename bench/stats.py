"""Statistics of the accuracy benchmark: per-sample errors, mode errors, bootstrap intervals.

On the analytic mixture the error of a few-step solver is dominated by *mode errors*: samples whose
exact ODE solution ends in one mixture component and the solver's output in another (measured:
per-sample relative errors of typically 0.5-1.2, against a median of 0.03-0.15 over all samples).
Where they dominate, the RMSE scales roughly with the square root of the mode-error count, so
halving it takes about four times fewer mode errors, and with ~10 such samples among 1024 the
ratio of two RMSEs is itself uncertain by tens of percent. These helpers report both, next to the
RMSE ratios.
"""
from __future__ import annotations

import math

import torch


def component(gmm, x: torch.Tensor) -> torch.Tensor:
    """Index of the mixture component each clean sample of ``x`` (B, d) most likely belongs to."""
    x = x.double()
    clean = torch.ones(x.shape[0], dtype=torch.float64), torch.zeros(x.shape[0], dtype=torch.float64)
    logn, _ = gmm._component_terms(x, *clean)          # log N_k(x) at alpha = 1, noise 0
    return (logn + gmm.weights.log()[None]).argmax(-1)


def bootstrap_ratio(errs_a: torch.Tensor, errs_b: torch.Tensor, draws: int = 2000, seed: int = 0,
                    level: float = 0.9) -> tuple[float, float]:
    """Two-sided ``level`` interval of RMSE(a) / RMSE(b), resampling the held-out noises (paired)."""
    g = torch.Generator().manual_seed(seed)
    n = errs_a.numel()
    idx = torch.randint(0, n, (draws, n), generator=g)
    ratio = errs_a.double()[idx].pow(2).mean(1).sqrt() / errs_b.double()[idx].pow(2).mean(1).sqrt().clamp(min=1e-300)
    lo, hi = torch.quantile(ratio, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


def best_label(per_sample: dict, labels, nfe: int):
    """The label with the lowest RMSE at ``nfe`` among ``labels`` (None when none ran there)."""
    found = [(float(per_sample[lab][nfe][0].pow(2).mean().sqrt()), lab) for lab in labels if nfe in per_sample[lab]]
    found = [f for f in found if math.isfinite(f[0])]
    return min(found)[1] if found else None
