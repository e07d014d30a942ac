"""NASA on Lumina Image 2.0 (NextDiT), whose forward calls no block patches in ComfyUI 0.3.64 (the node: nodes/nasa.py).

A NextDiT forward refines the caption alone (context refiner), the image alone (noise refiner), then runs its main
layers over the joint sequence [caption; image]; rotary positions count the caption's tokens up from 0 and put every
image token at the caption's length on that axis. A DIFFUSION_MODEL wrapper appends the negative's tokens to the
caption (and to ``num_tokens``), so the network carries them as a longer caption, and for that forward:

* moves every position after the positive's tokens back by the negative's length on the caption axis (the network's
  ``rope_embedder`` is swapped for one that does so, and put back after the forward): the positive's tokens and the
  image keep their own positions, and the negative's sit where its own forward puts them relative to the image (a
  rotary table depends only on differences of positions);
* installs an attention override that numbers the forward's calls: in the context refiner the positive's and the
  negative's tokens attend each to their own; the noise refiner's calls pass through; in every main layer the
  sequence is [positive; negative; image], which nasa_math.joint_nasa_attention splits as on Flux: the positive's and
  image rows see what they would see without the negative, the negative's rows attend to [negative; image], the
  steered image rows get - alpha times their attention over the negative.

The calls over the negative alone are marked as this node's own (attention_chain), so PAG's call numbering and a
second NASA node pass them by; the tokens appended are recorded (attention_chain.add_text_tokens), so PAG's wrapper,
inside this one, counts the prompt's. Several NASA nodes chain: the first applied is the outer wrapper, so its tokens
come first after the prompt's; the override of the last applied runs first and hands the earlier ones the sequence
without its own tokens. A forward with another call count or sequence length stops with a clear error; a prompt whose
conditioning carries padding (an attention mask with zeros) is refused. OmniGen2, whose network follows NextDiT's,
runs the same steps (``steered``) from its own wrapper, nodes/nasa_omnigen2.py.
"""
from __future__ import annotations

import torch

import comfy.patcher_extension as pe

from ..guidance import nasa as nasa_math
from . import attention_chain
from .attention_chain import chained
from .dit_layout import image_tokens
from .nasa_dit import _to_batch as _batch

NAME = "NASA (TrainFree) on Lumina 2"


def check_negative(negative):
    """A ValueError where the negative's attention mask has zeros (padding NASA cannot place)."""
    mask = negative[1].get("attention_mask")
    if mask is not None and int(mask.sum()) != mask.numel():
        raise ValueError("NASA: the negative's conditioning carries padding (an attention mask with zeros), which NASA "
                         "does not support on Lumina 2 and OmniGen2; encode the negative prompt on its own with "
                         "CLIPTextEncode")


class _ShiftedRope(torch.nn.Module):
    """A rotary embedder with every position from ``start`` on moved back by ``shift`` on axis 0; ``text_axes``
    (OmniGen2, which counts a caption's positions on all three axes): the ``shift`` tokens from ``start`` on also moved
    back by ``start`` on the other two axes, where they then count up from 0 as in their own pass."""

    def __init__(self, inner, start, shift, text_axes=False):
        super().__init__()
        self.inner, self.start, self.shift, self.text_axes = inner, start, shift, text_axes

    def forward(self, ids):
        ids = ids.clone()
        ids[:, self.start:, 0] -= self.shift
        if self.text_axes:
            ids[:, self.start:self.start + self.shift, 1:] -= self.start
        return self.inner(ids)


def _override(name, earlier, state, rows, t_pos, t_neg, img, counts, alpha):
    """This forward's attention override over the caption (t_pos + t_neg tokens) and ``img`` image tokens;
    ``counts``: (context refiner, passed-through image refiner, main) calls."""
    n_ctx, n_noise, _ = counts

    def override(func, *a, **kw):
        if attention_chain.is_own(kw):
            return chained(earlier, func, *a, **kw)
        call = state["calls"]
        state["calls"] = call + 1
        if n_ctx <= call < n_ctx + n_noise:
            return chained(earlier, func, *a, **kw)
        q, k, v = a[:3]
        heads = a[3] if len(a) > 3 else kw.pop("heads")
        if not kw.get("skip_reshape", False):
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        n, text = q.shape[2], t_pos + t_neg
        want = text if call < n_ctx else text + img
        if n != want:
            raise RuntimeError(f"{name}: attention call {call + 1} is over {n} tokens where {want} were expected "
                               f"({t_pos} + {t_neg} caption" + ("" if call < n_ctx else f", {img} image") +
                               " tokens); this ComfyUI's network joins its tokens differently")
        if kw.pop("mask", a[4] if len(a) > 4 else None) is not None:
            raise RuntimeError(f"{name}: an attention call with a mask; this ComfyUI's network masks its tokens, "
                               "which NASA does not support")
        sub = dict(kw, skip_reshape=True, skip_output_reshape=True)
        mine = attention_chain.own(sub)
        # [positive; negative; image]; in the context refiner no image: each prompt's tokens attend to their own
        def attend(q_, k_, v_, m_, options=mine):
            return chained(earlier, func, q_, k_, v_, heads, **options)
        out = nasa_math.joint_nasa_attention(q, k, v, t_pos, t_neg, alpha, rows, attend,
                                             attend_pos=lambda q_, k_, v_, m_: attend(q_, k_, v_, m_, sub))
        if kw.get("skip_output_reshape", False):
            return out
        b, h, _, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)
    return override


def layer_counts(dm) -> tuple[int, int, int]:
    """(context refiner, noise refiner, main) attention calls of a NextDiT forward, one per layer."""
    return len(dm.context_refiner), len(dm.noise_refiner), len(dm.layers)


def check_prompt(name, num_tokens, context, attention_mask):
    """The prompt's token count: a RuntimeError where its conditioning carries padding."""
    if attention_mask is not None:
        raise RuntimeError(f"{name}: the prompt's conditioning carries padding (an attention mask with zeros), "
                           "which NASA does not support; encode each prompt on its own with CLIPTextEncode")
    if int(num_tokens) != context.shape[1]:
        raise RuntimeError(f"{name}: the prompt has {context.shape[1]} tokens but the network is told "
                           f"{int(num_tokens)}; encode each prompt on its own with CLIPTextEncode")
    return int(num_tokens)


def steered(name, run, to, rows, rope_owner, t_pos, t_neg, img, counts, alpha, text_axes=False):
    """``run(to)`` (the forward, the negative's ``t_neg`` tokens appended to the prompt's ``t_pos``) with this node's
    override in a copy of ``to`` and ``rope_owner.rope_embedder`` swapped for the shifted one; ``counts``: (context
    refiner, passed-through, main) attention calls of this forward, checked after it (0: a cache inside skipped it)."""
    state = {"calls": 0}
    to = attention_chain.counting(attention_chain.add_text_tokens(to, context=t_neg),
                                  lambda n: state.update(calls=state["calls"] + n))
    to["optimized_attention_override"] = _override(name, to.get("optimized_attention_override"), state, rows, t_pos,
                                                   t_neg, img, counts, alpha)
    rope = rope_owner.rope_embedder
    rope_owner.rope_embedder = _ShiftedRope(rope, t_pos, t_neg, text_axes)
    try:
        out = run(to)
    finally:
        rope_owner.rope_embedder = rope
    if state["calls"] not in (0, sum(counts)):
        raise RuntimeError(f"{name}: the network made {state['calls']} attention calls, {sum(counts)} expected "
                           f"({counts[0]} context refiner, {counts[1]} image refiner and {counts[2]} main layers); "
                           "this ComfyUI's network calls attention differently")
    return out


def wrapper(neg, alpha, window, counts):
    """The DIFFUSION_MODEL wrapper, for the node's negative device cache ``neg`` and a network's ``layer_counts``; a
    forward with no row to steer (unconditional only, or outside the window) runs as it is."""
    def wrap(executor, x, timesteps, context, num_tokens, attention_mask=None, *rest, **kwargs):
        to = kwargs.get("transformer_options", {})
        rows = window.rows(to, x.shape[0], x.device)
        if not bool(rows.any()):
            return executor(x, timesteps, context, num_tokens, attention_mask, *rest, **kwargs)
        t_pos = check_prompt(NAME, num_tokens, context, attention_mask)
        dm = executor.class_obj
        extra = _batch(neg.get(context.device, context.dtype), x.shape[0])
        t_neg = extra.shape[1]
        return steered(NAME, lambda to: executor(x, timesteps, torch.cat([context, extra], dim=1), t_pos + t_neg,
                                                 attention_mask, *rest, **dict(kwargs, transformer_options=to)),
                       to, rows, dm, t_pos, t_neg, image_tokens(x, None, dm.patch_size), counts, alpha)
    return wrap


def patch(m, dm, neg, alpha, window):
    """Install NASA on the clone ``m`` of a Lumina 2 model (network ``dm``)."""
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "trainfree_nasa", wrapper(neg, alpha, window,
                                                                                  layer_counts(dm)))
