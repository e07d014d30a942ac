"""The transformer options of a PixArt-alpha / Sigma forward (ComfyUI 0.3.64's PixArtMS), for its attention calls
and blocks, which do not get them from the network.

PixArtMS's forward drops its ``transformer_options`` before the blocks, and its attention modules call
``optimized_attention`` without them, so an attention override (PAG's, NASA's) never reaches a PixArt attention call
and a block patch is never asked for. For the forwards of a model patched by one of the pack's nodes, an APPLY_MODEL
wrapper (the forward calls no DIFFUSION_MODEL wrapper) records the options of the network's call itself (a forward
pre-hook: the options after every wrapper has made its change) and, for that forward only, points the name
``optimized_attention`` in comfy.ldm.pixart.blocks at a function that hands each call those options, as the other
DiTs' attention modules do; ComfyUI's function is put back afterwards, also when the forward fails. A call that
carries its own options (a later ComfyUI) keeps them. ``current()`` gives the options to the block stand-ins of the
DiT Block Cache (nodes/block_patches.py). The network's modules, weights and code are not changed.
"""
from __future__ import annotations

import comfy.ldm.pixart.blocks as pixart_blocks
import comfy.ldm.pixart.pixartms as pixart_model
import comfy.patcher_extension as pe

KEY = "trainfree_pixart_options"
_running: list[dict] = []       # the options of the PixArt forwards under way, innermost last
_handing: dict = {}             # ComfyUI's attention function -> the one that hands it the options (one object each,
#                                 so that a compiled network's guard on the name holds from one forward to the next)


def is_pixart(dm) -> bool:
    return isinstance(getattr(dm, "_orig_mod", dm), pixart_model.PixArtMS)


def current() -> dict:
    """The transformer options of the PixArt forward under way ({} outside one)."""
    return _running[-1] if _running else {}


def _handing_to(func):
    if func not in _handing:
        def attention(*args, **kwargs):
            if _running and kwargs.get("transformer_options") is None:
                kwargs["transformer_options"] = _running[-1]
            return func(*args, **kwargs)
        _handing[func] = attention
    return _handing[func]


def _record(module, args, kwargs):
    _running.append(kwargs.get("transformer_options") or {})


def _wrapper(executor, *args, **kwargs):
    dm = executor.class_obj.diffusion_model
    dm = getattr(dm, "_orig_mod", dm)           # core's TorchCompileModel puts the compiled module there during a call
    held = pixart_blocks.optimized_attention
    if held in _handing.values():               # a second node's wrapper inside the first one's
        return executor(*args, **kwargs)
    depth = len(_running)
    hook = dm.register_forward_pre_hook(_record, with_kwargs=True)
    pixart_blocks.optimized_attention = _handing_to(held)
    try:
        return executor(*args, **kwargs)
    finally:
        pixart_blocks.optimized_attention = held
        hook.remove()
        del _running[depth:]


def into(to: dict) -> None:
    """Add the wrapper to the transformer options ``to`` (a copy the caller owns: PAG's perturbed pass) unless it is
    there."""
    wrappers = to["wrappers"] = dict(to.get("wrappers", {}))
    around = wrappers[pe.WrappersMP.APPLY_MODEL] = dict(wrappers.get(pe.WrappersMP.APPLY_MODEL, {}))
    if not around.get(KEY):
        around[KEY] = [_wrapper]


def install(m) -> None:
    """Give the clone ``m`` of a PixArt model the wrapper (once, whichever of the pack's nodes asks first)."""
    if not m.wrappers.get(pe.WrappersMP.APPLY_MODEL, {}).get(KEY):
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, KEY, _wrapper)
