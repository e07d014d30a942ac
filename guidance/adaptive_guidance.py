"""Adaptive Guidance (AG): stop evaluating the unconditional branch once it agrees with the
conditional one.

Paper: Castillo, Roy, Huang, Rothe, "Adaptive Guidance: Training-free Acceleration of Conditional
Diffusion Models" (AAAI 2025, arXiv 2312.12487). At each step the cosine similarity of the
conditional and unconditional noise estimates, gamma = cos(x - D_c, x - D_u) (flattened per
sample), is compared with a threshold; CFG D_u + w (D_c - D_u) is used while gamma < threshold,
and from the first step where gamma >= threshold on, guidance is off for that sample: D = D_c,
and its unconditional branch is no longer evaluated (one network evaluation per step instead of
two). The decision is per batch item (the paper's batch is one prompt; a batch of different
prompts crosses at different steps). threshold >= 1 never switches off: plain CFG.
"""
from __future__ import annotations

import torch


def agreement(x: torch.Tensor, d_cond: torch.Tensor, d_uncond: torch.Tensor) -> torch.Tensor:
    """gamma = cos(x - D_c, x - D_u) per sample (B,), computed in float64 (float32 on MPS)."""
    acc = torch.float32 if x.device.type == "mps" else torch.float64
    a = (x - d_cond).reshape(x.shape[0], -1).to(acc)
    b = (x - d_uncond).reshape(x.shape[0], -1).to(acc)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)


class AdaptiveGuidance:
    """Per-sample switch-off state for one sampling run."""

    def __init__(self, threshold: float, batch: int, device=None):
        if not (0.0 <= threshold):
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
        self.threshold = float(threshold)
        self.guided = torch.ones(batch, dtype=torch.bool, device=device)
        self.saved = 0            # unconditional evaluations skipped (per batch item)
        self.total = 0            # unconditional evaluations plain CFG would have made

    def _keep(self, x, d_cond, d_uncond) -> torch.Tensor:
        """Switch off the rows whose agreement reached the threshold; the still-guided rows as a mask."""
        if self.threshold < 1.0:
            gamma = agreement(x, d_cond, d_uncond).to(self.guided.device)
            self.guided = self.guided & (gamma < self.threshold)
        return self.guided.to(x.device).view(-1, *([1] * (x.ndim - 1)))

    def combine(self, x, d_cond, d_uncond, scale: float) -> torch.Tensor:
        """The prediction for this step. Rows still guided give their real d_uncond; for rows already
        switched off d_uncond is ignored (pass anything finite, e.g. d_cond). A row whose agreement
        reaches the threshold is switched off from this step on (paper: D = D_c once gamma >= threshold)."""
        return torch.where(self._keep(x, d_cond, d_uncond), d_uncond + scale * (d_cond - d_uncond), d_cond)

    def select(self, x, d_cond, d_uncond) -> torch.Tensor:
        """For a host that combines predictions itself (ComfyUI's CFG and its patches): the
        unconditional prediction with switched-off rows replaced by the conditional one, so any
        CFG formula gives D_c there."""
        return torch.where(self._keep(x, d_cond, d_uncond), d_uncond, d_cond)

    def count(self, evaluated: int, batch: int) -> None:
        self.total += batch
        self.saved += batch - evaluated
