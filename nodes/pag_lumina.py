"""PAG on Lumina Image 2.0 (NextDiT), whose forward calls no block patches in ComfyUI 0.3.64.

Every attention call of a NextDiT forward passes the same ``transformer_options``, in a fixed order: the caption
refiner's layers, the noise refiner's layers, then the main layers, one call each. In the perturbed pass only, a
DIFFUSION_MODEL wrapper numbers the calls of each forward and an attention override perturbs those of the chosen
main layers: their joint sequence is [caption (that row's real tokens); image; padding], and the image rows see the
caption keys and their own key only (as on the other joint-attention DiTs). The wrapper checks the count at the end
of the forward and stops with a clear error where another ComfyUI's NextDiT calls attention differently. A NASA
wrapper outside this one has appended the negative's tokens to the caption; they are not counted (NASA's override
hands on the prompt's calls without them).
"""
from __future__ import annotations

import torch

from ..guidance import pag as pag_math
from . import attention_chain, pag_counted
from .dit_layout import image_tokens


def _perturbed(q, k, v, caps, img, mask):
    """(B, H, N, D) joint attention with each row's image tokens [cap, cap + img) perturbed; ``mask``: Lumina's
    additive key mask (B, N) or None."""
    if mask is None and len(set(caps)) == 1:
        return pag_math.joint_identity_attention(q, k, v, caps[0], caps[0] + img)
    rows = []
    for i, cap in enumerate(caps):
        m = None if mask is None else mask[i if mask.shape[0] > 1 else 0].reshape(1, 1, 1, -1)
        rows.append(pag_math.joint_identity_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], cap, cap + img, mask=m))
    return torch.cat(rows)


def layer_counts(dm) -> tuple[int, int]:
    """(attention calls before the main layers, main layers) of a NextDiT forward."""
    return len(dm.context_refiner) + len(dm.noise_refiner), len(dm.layers)


def perturb(to, counts, layers):
    """Install the call-numbering wrapper and the override in ``to`` (the perturbed pass's transformer_options, a
    copy): ``counts`` the model's ``layer_counts``, ``layers`` the main-layer indices to perturb."""
    first, n_main = counts

    def on_forward(state, dm, x, timesteps, context, num_tokens, attention_mask=None, *args, **kwargs):
        p = dm.patch_size
        added = attention_chain.text_tokens_added(kwargs.get("transformer_options"), "context")   # NASA's, outside
        caps = [int(c) for c in attention_mask.sum(dim=1).tolist()] if attention_mask is not None else \
            [int(num_tokens) - added] * x.shape[0]
        state.update(caps=caps, img=image_tokens(x, None, p))

    def perturbed(state, *a, **kw):
        q, k, v = a[:3]
        mask = kw.get("mask", a[4] if len(a) > 4 else None)
        out = _perturbed(q, k, v, state["caps"], state["img"], mask)
        if kw.get("skip_output_reshape", False):
            return out
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)

    def mismatch(calls, want):
        return RuntimeError(f"PAG (TrainFree) on Lumina 2: the network made {calls} attention calls, "
                            f"{want} expected ({first} refiner and {n_main} main layers); this ComfyUI's "
                            "NextDiT calls attention differently, so PAG cannot find its layers")

    pag_counted.numbered(to, first + n_main, {first + i for i in layers}, on_forward, perturbed, mismatch)
