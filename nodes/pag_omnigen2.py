"""PAG on OmniGen2, whose forward calls no block patches and no DIFFUSION_MODEL wrapper in ComfyUI 0.3.64.

A forward's attention calls come in a fixed order, one per layer: the context refiner's (the text alone), the noise
refiner's (the image alone), the reference-image refiner's when the prompt brings reference latents (an edit), then
the main layers', each over the joint sequence [text; reference images; image] (0.3.64's main layers pass no mask).
In the perturbed pass only, an APPLY_MODEL wrapper (the one around every forward of this network) numbers each
forward's calls (pag_counted.numbered, shifted by the reference refiner's calls when it runs) and an attention
override perturbs those of the chosen main layers: the image rows, the reference images' included (as on Qwen-Image
Edit, whose reference tokens join the image stream), see the text keys and their own key only. The image token count
is read off the latent and the reference latents and checked against each perturbed call's length; a forward with
another call count stops with a clear error. A NASA wrapper outside this one has appended the negative's tokens to
the text; they are not counted (NASA's override hands on the prompt's calls without them).
"""
from __future__ import annotations

import comfy.ldm.omnigen.omnigen2 as omnigen_model
import comfy.patcher_extension as pe

from ..guidance import pag as pag_math
from . import attention_chain, pag_counted
from .dit_layout import image_tokens


def is_omnigen2(dm) -> bool:
    return isinstance(dm, omnigen_model.OmniGen2Transformer2DModel)


def layer_counts(dm) -> tuple[int, int, int, int]:
    """(calls before the main layers without reference latents, the reference refiner's calls, main layers, patch
    size), read once when patching."""
    return len(dm.context_refiner) + len(dm.noise_refiner), len(dm.ref_image_refiner), len(dm.layers), dm.patch_size


def perturb(to, counts, layers):
    """Install the call numbering and the override in ``to`` (the perturbed pass's transformer_options, a copy):
    ``counts`` the model's ``layer_counts``, ``layers`` the main-layer indices to perturb."""
    first, ref_calls, n_main, patch = counts

    def on_forward(state, model, x, t, c_concat=None, c_crossattn=None, *args, **kwargs):   # apply_model's inputs
        refs = kwargs.get("ref_latents")
        state["shift"] = ref_calls if refs is not None else 0
        to = kwargs.get("transformer_options", args[1] if len(args) > 1 else None)
        state["txt"] = c_crossattn.shape[1] - attention_chain.text_tokens_added(to, "context")   # NASA's, outside
        state["img"] = image_tokens(x, refs, patch)

    def rows(state, n):
        if n != state["txt"] + state["img"]:
            raise RuntimeError(f"PAG (TrainFree) on OmniGen2: an attention call over {n} tokens, {state['txt']} text "
                               f"and {state['img']} image tokens expected; this ComfyUI's OmniGen2 joins its "
                               "streams differently, so PAG cannot find the image tokens")
        return state["txt"], n

    def mismatch(calls, want):
        return RuntimeError(f"PAG (TrainFree) on OmniGen2: the network made {calls} attention calls, {want} expected "
                            "(refiners, then main layers); this ComfyUI's OmniGen2 calls attention differently, so "
                            "PAG cannot find its layers")

    pag_counted.numbered(to, first + n_main, {first + i for i in layers}, on_forward,
                         lambda state, *a, **kw: pag_math.perturbed_call(lambda n: rows(state, n), *a, **kw),
                         mismatch, around=pe.WrappersMP.APPLY_MODEL)
