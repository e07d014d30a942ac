"""NASA on HiDream-I1 / E1, whose forward calls no block patches in ComfyUI 0.3.64 (the node: nodes/nasa.py).

A DIFFUSION_MODEL wrapper appends the negative prompt's T5 tokens to ``context`` and its Llama tokens to every layer
of ``encoder_hidden_states_llama3``, so the network carries them through its text streams as it carries a prompt's
(every text position is 0 in HiDream's rotary table, which the network builds from the widened inputs). Every
attention call then runs over [image; T5; last Llama layer; the block's own Llama layer], in the double-stream
blocks and the single-stream ones alike, each text part now [positive; negative]. The wrapper installs, for that
forward, an attention override that gathers the sequence as [image; positive text; negative text], hands it to
nasa_math.joint_nasa_attention (image first) and scatters the result back: image and positive rows see what they
would see without the negative, the negative's rows attend to [image; negative text], and the steered image rows get
- alpha times their attention over the negative text. Only the ordinary joint attention goes down the override
chain as the network's call; the two over the negative are marked as this node's own (attention_chain), so PAG's
call numbering and a second NASA node pass them by.

Several NASA nodes chain: the first applied is the outer wrapper, so its tokens come first in each text part; the
override of the last applied runs first and hands the earlier ones the sequence without its own tokens.
"""
from __future__ import annotations

import torch

import comfy.patcher_extension as pe

from ..guidance import nasa as nasa_math
from . import attention_chain, dit_layout
from .attention_chain import chained
from .nasa_dit import _to_batch as _batch


def check_negative(dm, negative):
    """The negative's stacked Llama features (a ValueError when missing or shaped for another model)."""
    llama = negative[1].get("conditioning_llama3")
    if llama is None:
        raise ValueError("NASA: HiDream's negative needs its Llama features (conditioning_llama3): encode the negative "
                         "prompt with HiDream's text encoder (QuadrupleCLIPLoader)")
    want = dm.caption_projection[0].linear.in_features
    if llama.ndim != 4 or llama.shape[1] <= max(dm.llama_layers) or llama.shape[-1] != want \
            or llama.shape[0] != negative[0].shape[0]:
        raise ValueError(f"NASA: the negative's Llama features {tuple(llama.shape)} do not fit this HiDream model "
                         f"(batch {negative[0].shape[0]}, more than {max(dm.llama_layers)} layers, {want} features)")
    return llama


def _order(img, t5, ll, device):
    """Index of [image; positive text; negative text] in the call's [image; T5; Llama; Llama] sequence, whose text
    parts hold (positive, negative) tokens ``t5`` and ``ll``: (index, positive text count, negative text count)."""
    (t5p, t5n), (lp, ln) = t5, ll
    starts = (img, img + t5p + t5n, img + t5p + t5n + lp + ln)
    lengths = ((t5p, t5n), (lp, ln), (lp, ln))
    pos = [torch.arange(s, s + p, device=device) for s, (p, _) in zip(starts, lengths)]
    neg = [torch.arange(s + p, s + p + n, device=device) for s, (p, n) in zip(starts, lengths)]
    return torch.cat([torch.arange(img, device=device), *pos, *neg]), t5p + 2 * lp, t5n + 2 * ln


def _override(earlier, rows, img, t5, ll, alpha):
    """This forward's attention override: every call not marked as another node's own is a joint attention over
    ``img`` image tokens and the text parts ``t5`` / ``ll`` (positive, negative), regrouped once per forward."""
    order, t_pos, t_neg = _order(img, t5, ll, rows.device)
    def override(func, *a, **kw):
        if attention_chain.is_own(kw):
            return chained(earlier, func, *a, **kw)
        q, k, v = a[:3]
        heads = a[3] if len(a) > 3 else kw.pop("heads")
        if kw.pop("mask", a[4] if len(a) > 4 else None) is not None:
            raise RuntimeError("NASA (TrainFree) on HiDream: an attention call with a mask; this ComfyUI's HiDream "
                               "masks its tokens, which NASA does not support")
        if not kw.get("skip_reshape", False):
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        n = q.shape[2]
        if n != img + t5[0] + t5[1] + 2 * (ll[0] + ll[1]):
            raise RuntimeError(f"NASA (TrainFree) on HiDream: an attention call over {n} tokens where {img} image, "
                               f"{sum(t5)} T5 and 2 x {sum(ll)} Llama tokens were expected; this ComfyUI's HiDream "
                               "joins its streams differently")
        sub = dict(kw, skip_reshape=True, skip_output_reshape=True)
        mine = attention_chain.own(sub)

        def attend_pos(q_, k_, v_, m_):
            return chained(earlier, func, q_, k_, v_, heads, **sub)

        def attend_negative(q_, k_, v_, m_):
            return chained(earlier, func, q_, k_, v_, heads, **mine)
        got = nasa_math.joint_nasa_attention(q[:, :, order], k[:, :, order], v[:, :, order], t_pos, t_neg, alpha,
                                             rows, attend_negative, image_first=img, attend_pos=attend_pos)
        out = torch.empty_like(got)
        out[:, :, order] = got
        if kw.get("skip_output_reshape", False):
            return out
        b, h, _, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)
    return override


def wrapper(neg, neg_llama, alpha, window):
    """The DIFFUSION_MODEL wrapper, for the node's negative device cache ``neg`` (T5) and ``neg_llama`` (stacked Llama
    layers); a forward with no row to steer (unconditional only, or outside the window) runs as it is."""
    def wrap(executor, x, t, y, context, llama, *rest, **kwargs):
        in_kw = "transformer_options" in kwargs
        to = kwargs["transformer_options"] if in_kw else rest[-1]
        rows = window.rows(to, x.shape[0], x.device)
        if not bool(rows.any()):
            return executor(x, t, y, context, llama, *rest, **kwargs)
        b = x.shape[0]
        n5 = _batch(neg.get(context.device, context.dtype), b)
        nl = _batch(neg_llama.get(llama.device, llama.dtype), b)
        image_cond = rest[0] if rest else kwargs.get("image_cond")
        img = dit_layout.hidream_image_tokens(executor.class_obj.patch_size, x, image_cond)
        t5 = (context.shape[1], n5.shape[1])
        ll = (llama.shape[2], nl.shape[2])
        to = attention_chain.add_text_tokens(to, context=t5[1], llama=ll[1])
        to["optimized_attention_override"] = _override(to.get("optimized_attention_override"), rows, img, t5, ll, alpha)
        context, llama = torch.cat([context, n5], dim=1), torch.cat([llama, nl], dim=2)
        if in_kw:
            kwargs = dict(kwargs, transformer_options=to)
        else:
            rest = (*rest[:-1], to)
        return executor(x, t, y, context, llama, *rest, **kwargs)
    return wrap


def patch(m, dm, neg, neg_llama, alpha, window):
    """Install NASA on the clone ``m`` of a HiDream model (network ``dm``)."""
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "trainfree_nasa", wrapper(neg, neg_llama, alpha, window))
