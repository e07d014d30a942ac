"""NASA, Negative-Away Steer Attention: a negative prompt without CFG, in cross-attention.

Paper: Nguyen, Nguyen, Dao, Nguyen, Pham, Tran, Tran, "SNOOPI: Supercharged One-step Diffusion
Distillation with Proper Guidance" (arXiv 2412.02687; ICCV 2025 as "Supercharged One-step
Text-to-Image Diffusion Models with Negative Prompts"). In a cross-attention layer, with the layer's
own projections applied to the positive text c+ and the negative text c-:

    Z+ = softmax(Q K+^T / sqrt(d)) V+,   Z- = softmax(Q K-^T / sqrt(d)) V-,   Z_NASA = Z+ - alpha Z-

(paper Eq. 7-9, as transcribed in the pack's method notes: no normalisation or clamping). Only the
positive branch is run (cfg 1); it costs one extra attention per layer and no extra network pass.
alpha = 0.1 (SD1.5-based one-step models), 0.2 (SD2.1-based), 0.5 (PixArt-alpha); every
cross-attention layer. No official code was published (the project page says "coming soon").

Our choices where the paper is silent:
* with CFG (cfg > 1) the term is applied to the conditional rows only; the unconditional branch
  keeps its own plain cross-attention;
* cross-attention over a context (UNet attn2, Wan text-to-video): ``cross_nasa_attention``;
* joint text+image attention (Flux, SD3): the negative prompt's tokens are carried through the network
  as extra text tokens that the positive stream never sees; the image rows get
  Z+ (their ordinary attention over [positive text; image]) minus alpha times a separate
  cross-attention of the image queries over the negative text tokens only
  (``joint_nasa_attention``). The negative tokens themselves attend to [negative text; image]
  (what a negative-prompt pass would do), so their stream evolves block by block like a text stream.
  HunyuanVideo orders its joint sequence [image; text]: the negative tokens go last; a padding mask over
  the keys (its prompts' attention mask) is cut to each attention's keys.
"""
from __future__ import annotations

from typing import Callable

import torch


def steer(z_pos: torch.Tensor, z_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """Z_NASA = Z+ - alpha Z-."""
    return z_pos - alpha * z_neg


def cond_rows(cond_or_uncond, batch: int, device=None) -> torch.Tensor:
    """(batch,) bool: rows of a ComfyUI batched forward that belong to conditional chunks (0 = cond, 1 = uncond).
    ``cond_or_uncond`` None means one conditional chunk (every row)."""
    if not cond_or_uncond:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if batch % len(cond_or_uncond):
        raise ValueError(f"a batch of {batch} rows does not split into {len(cond_or_uncond)} chunks")
    per = batch // len(cond_or_uncond)
    flags = torch.tensor([c == 0 for c in cond_or_uncond], dtype=torch.bool, device=device)
    return flags.repeat_interleave(per)


def steer_rows(z_pos: torch.Tensor, rows: torch.Tensor, z_neg_rows: torch.Tensor, alpha: float) -> torch.Tensor:
    """Z+ with Z_NASA in ``rows`` (z_neg_rows holds Z- for those rows only, in order)."""
    if bool(rows.all()):
        return steer(z_pos, z_neg_rows, alpha)
    out = z_pos.clone()
    out[rows] = steer(z_pos[rows], z_neg_rows, alpha)
    return out


def cross_nasa_attention(q, k_pos, v_pos, k_neg, v_neg, alpha: float, rows: torch.Tensor,
                         attend: Callable, attend_pos: Callable | None = None) -> torch.Tensor:
    """UNet-style cross-attention (tensors (B, N, C)): Z+ for every row, Z+ - alpha Z- on ``rows``.
    ``attend(q, k, v)`` is the attention used for Z-; ``attend_pos`` (default ``attend``) for Z+ (e.g. a
    previous attn2 replace). k_neg / v_neg hold one row per selected row, or one row for all."""
    z_pos = (attend_pos or attend)(q, k_pos, v_pos)
    if alpha == 0.0 or not bool(rows.any()):
        return z_pos
    n = int(rows.sum())
    k_neg, v_neg = (t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t for t in (k_neg, v_neg))
    return steer_rows(z_pos, rows, attend(q[rows], k_neg, v_neg), alpha)


def _keys(mask, idx):
    """The part of an additive key mask (last dim: keys, broadcast over the queries) for the keys ``idx``."""
    return None if mask is None else mask.index_select(-1, idx.to(mask.device))


def joint_nasa_attention(q, k, v, t_pos: int, t_neg: int, alpha: float, rows: torch.Tensor,
                         attend: Callable, image_first: int | None = None, key_mask=None,
                         attend_pos: Callable | None = None) -> torch.Tensor:
    """Joint attention over [positive text (t_pos); negative text (t_neg); image] in (B, H, N, D), or, with
    ``image_first`` = the image token count, over [image; positive text; negative text] (HunyuanVideo).

    Positive-text and image rows attend to [positive text; image] exactly as without the negative
    tokens; negative-text rows attend to [negative text; image]; image rows of ``rows`` then get
    - alpha * (attention of their queries over the negative text only). ``attend(q, k, v, mask)`` works on
    (B, H, N, D) and returns (B, H, Nq, D); ``key_mask`` (None, or an additive mask over the N keys whose
    query dimension is 1: a padding mask) is cut to each call's keys. ``attend_pos`` (default ``attend``) makes the
    ordinary joint attention, ``attend`` the two over the negative text."""
    n, dev = q.shape[2], q.device
    if key_mask is not None and key_mask.ndim >= 2 and key_mask.shape[-2] != 1:
        raise ValueError(f"NASA: a mask of shape {tuple(key_mask.shape)} is not a key (padding) mask")
    if image_first is None:
        a, b, ok = t_pos, t_pos + t_neg, 0 <= t_pos <= t_pos + t_neg <= n
    else:
        a, b = image_first + t_pos, n
        ok = min(image_first, t_pos, t_neg) >= 0 and image_first + t_pos + t_neg == n
    if not ok:
        raise ValueError(f"text tokens {t_pos} + {t_neg} do not fit a sequence of {n}"
                         + ("" if image_first is None else f" with {image_first} image tokens"))
    image = torch.arange(b, n, device=dev) if image_first is None else torch.arange(0, image_first, device=dev)
    neg = torch.arange(a, b, device=dev)
    keep = torch.cat([torch.arange(0, a, device=dev), torch.arange(b, n, device=dev)])
    pos = (attend_pos or attend)(q[:, :, keep], k[:, :, keep], v[:, :, keep], _keys(key_mask, keep))   # ordinary
    out = torch.empty(pos.shape[0], pos.shape[1], n, pos.shape[3], dtype=pos.dtype, device=pos.device)
    out[:, :, keep] = pos
    if b == a:
        return out
    neg_keys = torch.cat([neg, image])
    out[:, :, a:b] = attend(q[:, :, a:b], k[:, :, neg_keys], v[:, :, neg_keys], _keys(key_mask, neg_keys))
    if alpha != 0.0 and bool(rows.any()) and image.numel():
        m = _keys(key_mask, neg)
        if m is not None and m.ndim >= 3 and m.shape[0] == q.shape[0] > 1:
            m = m[rows.to(m.device)]
        z_neg = attend(q[rows][:, :, image], k[rows][:, :, a:b], v[rows][:, :, a:b], m)
        out[:, :, image] = steer_rows(out[:, :, image], rows, z_neg, alpha)
    return out
