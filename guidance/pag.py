"""Perturbed-Attention Guidance (PAG): guide away from a prediction whose self-attention is the identity.

Paper: Ahn, Cho, Min, Jang, Kim, Kim, Park, Kim, Kim, "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance" (ECCV 2024, arXiv 2403.17377); official code KU-CVLAB /
sunovivid/Perturbed-Attention-Guidance. A second conditional pass is run with the self-attention map
of chosen layers replaced by the identity, softmax(QK^T/sqrt(d)) -> I, so each such layer outputs its
own value projection (then the usual output projection). With D~_c that perturbed prediction, in
ComfyUI's denoised space:

    D = D_u + w (D_c - D_u) + s (D_c - D~_c)        (w = CFG scale; at cfg 1: D = D_c + s (D_c - D~_c))

which is ComfyUI core's PerturbedAttentionGuidance formula (``cfg_result + (cond_pred - pag) * scale``).
Defaults from the official README: SD1.5 layer ``m0`` (mid block), SDXL ``mid``; scale 3.0 with CFG
(5.0 without). The ADM code declares ``linear``/``cosine`` scale schedules but raises "not supported"
for both, so only a sigma range is offered here.

Departure from the paper (DiTs, not covered by it): for joint text+image attention (SD3 MMDiT,
Flux double and single blocks) only the image-image part of the map becomes the identity: an image
query attends to the text keys and to its own key only, text queries attend as usual. This is the
convention of diffusers' PAGJointAttnProcessor2_0 (SD3 PAG pipeline: -inf on the image-image block
except its diagonal). For a pure self-attention (UNet attn1, Wan self-attention) it is exactly
"output = V". The joint case is computed without materialising the N x N mask when no mask is given.

Layer names (``parse_layers``): ``input.N``, ``middle.0``, ``output.N`` (UNet transformer blocks as
ComfyUI keys them, optionally ``.T`` for one transformer index), ``double.N`` / ``single.N`` (Flux),
``joint.N`` (SD3), ``block.N`` (Wan); ``kind.A-B`` is a range.
"""
from __future__ import annotations

import math
import re

import torch

KINDS = ("input", "middle", "output", "double", "single", "joint", "block")
_ITEM = re.compile(r"^(?P<kind>[a-z]+)\.(?P<a>\d+)(?:-(?P<b>\d+))?(?:\.(?P<t>\d+))?$")


def parse_layers(text: str) -> list[tuple[str, int, int | None]]:
    """``"middle.0, output.1.0, double.2-4"`` -> [("middle", 0, None), ("output", 1, 0), ("double", 2, None), ...].
    Raises ValueError with the accepted grammar on anything else; duplicates are dropped, order kept."""
    out: list[tuple[str, int, int | None]] = []
    for raw in re.split(r"[,\s]+", text.strip()):
        if not raw:
            continue
        m = _ITEM.match(raw.lower())
        if m is None or m["kind"] not in KINDS:
            raise ValueError(f"layer {raw!r} not understood: write kind.N, kind.N.T or kind.A-B with kind one of "
                             f"{', '.join(KINDS)} (e.g. 'middle.0, output.1' or 'double.3, single.10')")
        a = int(m["a"])
        b = int(m["b"]) if m["b"] is not None else a
        if b < a:
            raise ValueError(f"layer range {raw!r} runs backwards")
        t = int(m["t"]) if m["t"] is not None else None
        for i in range(a, b + 1):
            item = (m["kind"], i, t)
            if item not in out:
                out.append(item)
    if not out:
        raise ValueError("no layer given")
    return out


def format_layer(layer: tuple[str, int, int | None]) -> str:
    kind, i, t = layer
    return f"{kind}.{i}" if t is None else f"{kind}.{i}.{t}"


def validate_layers(layers, available) -> None:
    """``available``: the model's layers as (kind, index, transformer index or None). A requested layer with
    no transformer index matches any entry of that (kind, index). Raises ValueError listing the valid names."""
    blocks = {(k, i) for k, i, _ in available}
    exact = set(available)
    bad = [format_layer(ly) for ly in layers
           if ((ly[0], ly[1]) not in blocks if ly[2] is None else ly not in exact)]
    if bad:
        names = sorted({f"{k}.{i}" for k, i in blocks}, key=lambda s: (s.split(".")[0], int(s.split(".")[1])))
        raise ValueError(f"this model has no attention layer {', '.join(bad)}; its layers are: {', '.join(names)}")


def sigma_gate(sigma: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    """Rows whose sigma lies in [sigma_end, sigma_start] (both inclusive) get guidance."""
    return (sigma <= sigma_start) & (sigma >= sigma_end)


def combine(denoised: torch.Tensor, cond: torch.Tensor, perturbed: torch.Tensor, scale: float,
            gate: torch.Tensor | None = None) -> torch.Tensor:
    """denoised + s (D_c - D~_c); ``denoised`` is whatever CFG (and earlier post-CFG patches) produced.
    ``gate`` (B,) bool restricts the term to some rows; other rows are returned unchanged."""
    out = denoised + (cond - perturbed) * scale
    if gate is None:
        return out
    return torch.where(gate.to(out.device).view(-1, *([1] * (out.ndim - 1))), out, denoised)


def identity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Self-attention with the identity map: every token returns its own value (shape of v)."""
    return v


def joint_identity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, img_start: int, img_end: int,
                             mask: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """Attention over a joint sequence (B, H, N, D) in which image rows [img_start, img_end) see the other
    (text) keys and their own key only; every other row attends to all keys as usual (masked by ``mask``,
    an additive or boolean (.., N, N) mask, if given). Returns (B, H, N, D) in q's dtype."""
    n = q.shape[-2]
    if not (0 <= img_start <= img_end <= n):
        raise ValueError(f"image tokens [{img_start}, {img_end}) outside a sequence of {n}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    if mask is not None:                          # general path: one explicit mask
        add = torch.zeros(n, n, dtype=torch.float32, device=q.device)
        add[img_start:img_end, img_start:img_end] = float("-inf")
        idx = torch.arange(img_start, img_end, device=q.device)
        add[idx, idx] = 0.0
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=q.device).masked_fill(~mask, float("-inf"))
        full = add + mask.to(torch.float32)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full.to(q.dtype))
    out = torch.empty_like(q)
    other = torch.cat([torch.arange(0, img_start), torch.arange(img_end, n)]).to(q.device)
    if other.numel():                              # text rows: the ordinary attention over everything
        out[:, :, other] = torch.nn.functional.scaled_dot_product_attention(q[:, :, other], k, v)
    k_o, v_o = k[:, :, other].float(), v[:, :, other].float()
    for s in range(img_start, img_end, chunk):     # image rows: softmax over [text keys, own key]
        e = min(s + chunk, img_end)
        qi, ki, vi = q[:, :, s:e].float(), k[:, :, s:e].float(), v[:, :, s:e].float()
        own = (qi * ki).sum(-1, keepdim=True) * scale
        logits = torch.cat([qi @ k_o.transpose(-1, -2) * scale, own], dim=-1)
        w = torch.softmax(logits, dim=-1)
        out[:, :, s:e] = (w[..., :-1] @ v_o + w[..., -1:] * vi).to(q.dtype)
    return out


def _to_heads(t, heads):
    """(B, N, H*D) or (B, N, H, D) (SD3 passes V so) -> (B, H, N, D)."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def perturbed_call(img_range, *a, **kw):
    """An attention call ``(q, k, v, heads, mask=None, skip_reshape=..., skip_output_reshape=...)`` in ComfyUI's
    ``optimized_attention`` signature, perturbed: ``img_range(n)`` gives the image rows [start, end) of the n-token
    sequence (``joint_identity_attention``), or None for a pure self-attention (output V)."""
    q, k, v = a[:3]
    heads = a[3] if len(a) > 3 else kw["heads"]
    if not kw.get("skip_reshape", False):
        q, k, v = (_to_heads(t, heads) for t in (q, k, v))
    n = q.shape[-2]
    rows = img_range(n)
    if rows is None:
        out = v
    else:
        mask = kw.get("mask", a[4] if len(a) > 4 else None)     # Qwen-Image passes it positionally
        if mask is not None and mask.ndim == 3:
            mask = mask.unsqueeze(1)
        out = joint_identity_attention(q, k, v, rows[0], rows[1], mask=mask)
    if kw.get("skip_output_reshape", False):
        return out
    b, h, _, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)
