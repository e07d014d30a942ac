"""Searched step schedules: the time-step part of AutoDiffusion.

Paper: Li, Li, Zhu, Xie, Hu, Zhang, Ji, Wang, "AutoDiffusion: Training-Free Optimization of Time
Steps and Architectures for Automated Diffusion Model Acceleration" (ICCV 2023, arXiv 2309.10438).
The paper searches the step sequence of a fixed-NFE sampler by evolution, scoring candidates by
FID. Here the score is the distance of the sampler's output to a high-NFE reference solution from
the same noise (the issue's objective; no image statistics exist for an arbitrary model), and the
search is a bounded coordinate search: each interior step position, in log-SNR coordinates
between the model's largest and smallest sigma, is moved by +-delta while the score improves, and
delta halves when no move helps, until the evaluation budget is spent. The first sigma and the
final 0 stay fixed, the order of the steps is kept, and the schedule the search starts from
(e.g. Karras or the model's own scheduler) is never returned if it was not beaten.
"""
from __future__ import annotations

import torch

from .common import SamplerInputError, alpha_s, check_inputs, precise, resolve_kind


def _lam_to_sigma(lam: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "flow":
        return torch.sigmoid(-lam)          # alpha/s = (1 - t)/t = e^lam
    return torch.exp(-lam)


def _lam(sigma: torch.Tensor, kind: str) -> torch.Tensor:
    a, s = alpha_s(sigma, kind)
    return torch.log(a) - torch.log(s)


@torch.no_grad()
def search_schedule(model, x, initial_sigmas, sampler, reference, extra_args=None, kind=None, budget=60,
                    delta=0.2, options=None, sigma_min=None, progress=None):
    """Search the interior sigmas of ``initial_sigmas`` (n steps ending at 0) for ``sampler``.

    reference: the target output for noise state ``x`` (e.g. a many-step solution); sigma_min: the
    smallest nonzero sigma allowed (the model's; default: the initial schedule's). Returns (best
    sigmas, best score, initial score). Costs ``budget`` sampler runs at most.
    """
    extra_args = {} if extra_args is None else extra_args
    options = {} if options is None else options
    kind = resolve_kind(model, kind)
    check_inputs(x, initial_sigmas, kind)
    sig = initial_sigmas.detach().to("cpu", torch.float64)
    if sig[-1] != 0 or len(sig) < 3:
        raise SamplerInputError("the schedule search needs at least 2 steps ending at sigma 0")
    lam = _lam(sig[:-1], kind)
    lam_first = float(lam[0])                                          # -inf for a flow model at sigma 1
    lam_cap = float(_lam(torch.tensor([sigma_min if sigma_min else float(sig[-2])], dtype=torch.float64), kind))
    free = lam[1:].clone()                    # interior points in lambda (ascending = less noise)
    # keep steps from collapsing: a near-zero step makes multistep extrapolation blow up, which the
    # few search samples can reward by chance (observed: 6x better on them, worse on new noise)
    min_gap = 0.25 * float(free[-1] - free[0]) / max(1, free.numel() - 1) if free.numel() > 1 else 1e-3
    spent = [0]

    def score(points):
        sigmas = torch.cat([sig[:1], _lam_to_sigma(points, kind), sig[-1:]]).to(initial_sigmas)
        out = sampler(model, x.clone(), sigmas, extra_args=extra_args, disable=True, **options)
        spent[0] += 1
        if progress:
            progress(spent[0], budget)
        return float((out.to(precise(out)) - reference.to(precise(out))).pow(2).mean())

    def valid(points):
        gaps_ok = bool((points[1:] > points[:-1] + min_gap).all())
        return gaps_ok and float(points[0]) > lam_first + min_gap and float(points[-1]) <= lam_cap + 1e-9

    best = score(free)
    initial = best
    step = delta
    while spent[0] < budget and step > 1e-3:
        improved = False
        for i in range(free.numel()):
            for sign in (1.0, -1.0):
                if spent[0] >= budget:
                    break
                cand = free.clone()
                cand[i] += sign * step
                if not valid(cand):
                    continue
                val = score(cand)
                if val < best:
                    best, free, improved = val, cand, True
                    break
        if not improved:
            step /= 2
    sigmas = torch.cat([sig[:1], _lam_to_sigma(free, kind), sig[-1:]])
    return sigmas.to(initial_sigmas.dtype), best, initial
