"""NASA on Cosmos-Predict2 (text-to-image, video-to-world) and PixArt-alpha / Sigma, whose forwards call no block
patches in ComfyUI 0.3.64 (the node: nodes/nasa.py).

Every block makes two attention calls, a self-attention over the video tokens, then a cross-attention to the prompt's
T5 features (``crossattn_emb``, which no layer embeds before the blocks). A DIFFUSION_MODEL wrapper appends the
negative's T5 features to the context and installs, for that forward, an attention override that numbers the calls:
in every cross-attention (the odd ones) the block's own k / v projections (and their norms) have made keys for both
prompts, which the override splits, Z = Attn(Q, K+, V+) - alpha Attn(Q, K-, V-), exactly the U-Net formula; the
self-attentions pass through. The negative-prompt call is marked as NASA's own (attention_chain), so PAG's call
numbering and a second NASA node pass it by. A block cached by the DiT Block Cache (nodes/block_patches.py) makes
no call and reports its two. A forward with another call count, or a cross-attention over another key count, stops
with a clear error.

PixArt's blocks are the same (self-attention, then cross-attention to the T5 features, which its caption embedder
projects token by token, so appended tokens stay the negative's own), its cross-attention splits the batch's joined
captions back into rows before the call. Its forward calls no DIFFUSION_MODEL wrapper, so the wrapper goes around
apply_model, and its attention calls get the forward's options from nodes/pixart_options.py.
"""
from __future__ import annotations

import torch

import comfy.patcher_extension as pe

from ..guidance import nasa as nasa_math
from . import attention_chain, pixart_options
from .attention_chain import chained
from .nasa_dit import _to_batch as _batch


def _override(earlier, state, rows, t_pos, t_neg, alpha, name):
    """This forward's attention override: odd calls (the cross-attentions) over t_pos + t_neg keys are split."""
    def override(func, *a, **kw):
        if attention_chain.is_own(kw):
            return chained(earlier, func, *a, **kw)
        call = state["calls"]
        state["calls"] = call + 1
        if call % 2 == 0:
            return chained(earlier, func, *a, **kw)
        q, k, v = a[:3]
        heads = a[3] if len(a) > 3 else kw.pop("heads")
        tokens = -2 if kw.get("skip_reshape", False) else 1
        if k.shape[tokens] != t_pos + t_neg:
            raise RuntimeError(f"NASA (TrainFree) on {name}: attention call {call + 1} is over "
                               f"{k.shape[tokens]} keys where the cross-attention's {t_pos} + {t_neg} prompt tokens "
                               f"were expected; this ComfyUI's {name} calls attention differently")

        def part(t, start, length):
            return t.narrow(tokens, start, length)

        def attend(q_, k_, v_):
            return chained(earlier, func, q_, k_, v_, heads, **kw)

        def attend_negative(q_, k_, v_):
            return chained(earlier, func, q_, k_, v_, heads, **attention_chain.own(kw))
        return nasa_math.cross_nasa_attention(q, part(k, 0, t_pos), part(v, 0, t_pos), part(k[rows], t_pos, t_neg),
                                              part(v[rows], t_pos, t_neg), alpha, rows, attend_negative, attend)
    return override


def _steer(run, x, context, to, neg, alpha, window, blocks, name):
    """One forward, ``run(context, transformer_options)``, with the negative appended to ``context`` and every
    cross-attention split; a forward with no row to steer (unconditional only, or outside the window) runs as it is."""
    rows = window.rows(to, x.shape[0], x.device)
    if not bool(rows.any()):
        return run(context, to)
    extra = _batch(neg.get(context.device, context.dtype), x.shape[0])
    state = {"calls": 0}
    to = attention_chain.counting(to, lambda n: state.update(calls=state["calls"] + n))   # a block cache's skips
    to["optimized_attention_override"] = _override(to.get("optimized_attention_override"), state, rows,
                                                   context.shape[1], extra.shape[1], alpha, name)
    out = run(torch.cat([context, extra], dim=1), to)
    if state["calls"] not in (0, 2 * blocks):     # 0: a cache inside this wrapper (EasyCache) skipped it
        raise RuntimeError(f"NASA (TrainFree) on {name}: the network made {state['calls']} attention calls, "
                           f"{2 * blocks} expected (a self- and a cross-attention per block); this ComfyUI's "
                           f"{name} calls attention differently")
    return out


def wrapper(neg, alpha, window, blocks):
    """Cosmos-Predict2's DIFFUSION_MODEL wrapper, for the node's negative device cache ``neg`` and a network of
    ``blocks`` blocks."""
    def wrap(executor, x, timesteps, context, *rest, **kwargs):
        return _steer(lambda c, to: executor(x, timesteps, c, *rest, **dict(kwargs, transformer_options=to)), x,
                      context, kwargs.get("transformer_options", {}), neg, alpha, window, blocks, "Cosmos-Predict2")
    return wrap


def pixart_wrapper(neg, alpha, window, blocks):
    """PixArt's APPLY_MODEL wrapper (its forward calls no DIFFUSION_MODEL wrapper); the prompt is ``c_crossattn``."""
    def wrap(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        return _steer(lambda c, to: executor(x, t, c_concat, c, control, to, **kwargs), x, c_crossattn,
                      transformer_options or {}, neg, alpha, window, blocks, "PixArt")
    return wrap


def patch(m, dm, neg, alpha, window):
    """Install NASA on the clone ``m`` of a Cosmos-Predict2 or PixArt model (network ``dm``)."""
    if pixart_options.is_pixart(dm):
        pixart_options.install(m)        # its attention calls get no options from the network
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "trainfree_nasa", pixart_wrapper(neg, alpha, window,
                                                                                           len(dm.blocks)))
        return
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "trainfree_nasa", wrapper(neg, alpha, window, len(dm.blocks)))
