"""Hybrid base -> distilled inference ("diversity distillation").

Paper: Gandikota & Bau, "Distilling Diversity and Control in Diffusion Models" (arXiv 2503.10637).
Distilled few-step models (DMD, Turbo, Lightning, LCM) lose the sample diversity of their base
model, and the paper traces it to the first, highest-noise step, where the overall composition is
decided. Hybrid inference runs that step with the *base* model (with its CFG) and hands the
partially denoised latent to the distilled model for the remaining steps:

    x(σ_k) = sampler(base ⊕ CFG, x(σ_0), σ_0 … σ_k)          k = base_steps (paper: 1)
    x(0)   = sampler(distilled,  x(σ_k), σ_k … σ_N)

Both segments use the same sigma schedule (the distilled model's), so the hand-off is exact only
when both models read σ the same way: the same sigma space (VE for eps / v-prediction, rectified
flow for CONST) and the same latent format; other pairs are refused. The paper's script runs the
base model for several of its own steps down to the distilled σ_1: ``base_substeps`` m splits each
base step into m (geometric in σ; linear into σ = 0), which is that schedule when base_steps = 1.
Multistep samplers restart their history at the hand-off (as two chained KSamplerAdvanced do).
"""
from __future__ import annotations

import torch


def switch_index(steps: int, base_steps: int) -> int:
    """Number of steps (from the first) sampled with the base model, clamped to [0, steps]."""
    if base_steps < 0:
        raise ValueError(f"base_steps must be >= 0, got {base_steps}")
    return min(int(base_steps), int(steps))


def refine(sigmas: torch.Tensor, substeps: int) -> torch.Tensor:
    """Each interval of ``sigmas`` split into ``substeps`` (geometric between positive sigmas, linear to 0)."""
    if substeps < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")
    if substeps == 1:
        return sigmas
    parts = [sigmas[:1]]
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        t = torch.linspace(0.0, 1.0, substeps + 1, dtype=torch.float64)[1:]     # on the CPU (MPS has no float64)
        a64, b64 = a.to("cpu", torch.float64), b.to("cpu", torch.float64)
        seg = a64 * (b64 / a64) ** t if float(b) > 0 and float(a) > 0 else a64 + (b64 - a64) * t
        seg[-1] = b64                                            # the hand-off sigma exactly
        parts.append(seg.to(sigmas.device, sigmas.dtype))
    return torch.cat(parts)


def check_compatible(base_kind: str, distilled_kind: str, base_latent: str, distilled_latent: str) -> None:
    """Refuse a pair of models whose latents or sigma spaces differ (no exact hand-off exists)."""
    problems = []
    if base_kind != distilled_kind:
        problems.append(f"sigma space: base is {base_kind!r}, distilled is {distilled_kind!r}")
    if base_latent != distilled_latent:
        problems.append(f"latent format: base is {base_latent}, distilled is {distilled_latent}")
    if problems:
        raise ValueError("Hybrid inference needs two models of the same family (a base model and its distilled "
                         "version, e.g. SDXL + SDXL-Turbo/Lightning/DMD2, or Flux-dev + Flux-schnell); "
                         + "; ".join(problems))


def offset_callback(callback, offset: int, total: int):
    """A sampler callback of one segment reporting global step numbers to ``callback``."""
    if callback is None:
        return None

    def cb(step, x0, x, _total):
        return callback(step + offset, x0, x, total)

    return cb


def sample_hybrid(sampler, base, distilled, x, sigmas, base_steps: int = 1, extra_args=None, base_substeps: int = 1,
                  **options):
    """Pure version for denoisers with ComfyUI's sampler signature (``x`` already noised at sigmas[0])."""
    n = len(sigmas) - 1
    k = switch_index(n, base_steps)
    if k > 0:
        x = sampler(base, x, refine(sigmas[: k + 1], base_substeps), extra_args=extra_args, **options)
    if k < n:
        x = sampler(distilled, x, sigmas[k:], extra_args=extra_args, **options)
    return x
