"""NASA on OmniGen2, whose forward calls no block patches and no DIFFUSION_MODEL wrapper in ComfyUI 0.3.64 (the node:
nodes/nasa.py; the machinery it shares with Lumina 2, whose network OmniGen2's follows: nodes/nasa_lumina.py).

OmniGen2 refines the text alone (context refiner), the image alone (noise refiner) and, in an edit, the reference
images alone (reference refiner), then runs its main layers over [text; reference images; image]. Its rotary
positions count the text's tokens up from 0 on all three axes and put the reference images and the image from the
text's length on on the first. An APPLY_MODEL wrapper (the one around every forward of this network) appends the
negative's tokens to the prompt's (and to ``num_tokens``) and, for that forward, swaps the rotary embedder for one
that moves every position after the prompt's tokens back by the negative's length on the first axis, and the
negative's tokens back by the prompt's length on the other two: the prompt, the reference images and the image keep
their positions, the negative's tokens get those of its own pass relative to the images. An override numbering the
calls lets each prompt's tokens attend to their own in the context refiner, passes the image refiners' calls through,
and splits every main layer's [prompt; negative; reference images and image] as on Flux; the reference images count
as image (as PAG counts them), so they are steered too.
"""
from __future__ import annotations

import torch

import comfy.patcher_extension as pe

from . import nasa_lumina
from .nasa_dit import _to_batch as _batch
from .dit_layout import image_tokens

NAME = "NASA (TrainFree) on OmniGen2"


def wrapper(neg, alpha, window, counts):
    """The APPLY_MODEL wrapper, for the node's negative device cache ``neg`` and ``counts``: (context refiner, noise
    refiner, reference refiner, main) layers, patch size; a forward with no row to steer runs as it is."""
    n_ctx, n_noise, n_ref, n_main, patch = counts

    def wrap(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        to = transformer_options if transformer_options is not None else {}
        rows = window.rows(to, x.shape[0], x.device)
        if not bool(rows.any()):
            return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
        t_pos = nasa_lumina.check_prompt(NAME, kwargs.get("num_tokens", 0), c_crossattn, kwargs.get("attention_mask"))
        extra = _batch(neg.get(c_crossattn.device, c_crossattn.dtype), x.shape[0])
        refs = kwargs.get("ref_latents")
        img = image_tokens(x, refs, patch)
        counts = (n_ctx, n_noise + (n_ref if refs is not None else 0), n_main)
        context = torch.cat([c_crossattn, extra], dim=1)
        longer = dict(kwargs, num_tokens=context.shape[1])
        return nasa_lumina.steered(NAME, lambda to_: executor(x, t, c_concat, context, control, to_, **longer), to,
                                   rows, executor.class_obj.diffusion_model.rope_embedder, t_pos, extra.shape[1], img,
                                   counts, alpha, text_axes=True)
    return wrap


def layer_counts(dm) -> tuple[int, int, int, int, int]:
    """(context refiner, noise refiner, reference refiner, main) attention calls, one per layer, and the patch size."""
    return len(dm.context_refiner), len(dm.noise_refiner), len(dm.ref_image_refiner), len(dm.layers), dm.patch_size


def patch(m, dm, neg, alpha, window):
    """Install NASA on the clone ``m`` of an OmniGen2 model (network ``dm``)."""
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "trainfree_nasa", wrapper(neg, alpha, window, layer_counts(dm)))
