"""Block patches for the main layers of Lumina Image 2.0 (NextDiT) and OmniGen2, whose forwards do not offer them in
ComfyUI 0.3.64.

ComfyUI's DiTs hand each block to ``transformer_options["patches_replace"]["dit"][("double_block", i)]`` when a
node has put a replacement there; NextDiT's forward runs ``for layer in self.layers: x = layer(x, mask, freqs_cis,
adaln_input, transformer_options=...)`` instead (OmniGen2's the same, with its timestep embedding last). For the
forwards of a model that carries such replacements, a DIFFUSION_MODEL wrapper (OmniGen2, whose forward calls none:
APPLY_MODEL) puts a stand-in for ``layers`` in place (and the network's own back afterwards): iterating it
gives, per layer, a callable that hands the layer to its replacement with the arguments ``{"img": x, "vec":
adaln_input, "pe": freqs_cis, "attn_mask": mask, "transformer_options": ...}`` and ``original_block`` running the
layer itself, as Flux's single blocks are handed over. The layers' modules are the network's own (their weights,
LoRA-patched or not, are not copied), so only the loop changes. When a replacement skips its layer (a block cache's
cached step), the attention call the layer would have made is reported (attention_chain.skipped), so the call
numbering of PAG and NASA on these networks keeps counting the layers after it as their own.
"""
from __future__ import annotations

import inspect

import torch

import comfy.patcher_extension as pe

from . import attention_chain

KEY = "trainfree_block_patches"


def native(dm) -> bool:
    """Whether the network's forward already hands its layers to block patches (a later ComfyUI)."""
    try:
        return "patches_replace" in inspect.getsource(getattr(type(dm), "_forward", type(dm).forward))
    except (OSError, TypeError, AttributeError):
        return False


def _layer(i, layer):
    def run(x, mask, freqs_cis, adaln_input, transformer_options=None):
        to = transformer_options if transformer_options is not None else {}
        patch = ((to.get("patches_replace") or {}).get("dit") or {}).get(("double_block", i))
        if patch is None:
            return layer(x, mask, freqs_cis, adaln_input, transformer_options=to)
        ran = [False]

        def original(args):
            ran[0] = True
            return {"img": layer(args["img"], args["attn_mask"], args["pe"], args["vec"],
                                 transformer_options=args["transformer_options"])}
        out = patch({"img": x, "vec": adaln_input, "pe": freqs_cis, "attn_mask": mask, "transformer_options": to},
                    {"original_block": original})
        if not ran[0]:
            attention_chain.skipped(to, 1)      # the layer's one attention call
        return out["img"]
    return run


class _Layers(torch.nn.Module):
    """Stands in for the network's ``layers`` for one forward (a module, as the network's attribute must be); the
    network's list is held outside the module tree, so the state dict does not change."""

    def __init__(self, layers):
        super().__init__()
        self._held = (layers,)

    def __iter__(self):
        return iter([_layer(i, layer) for i, layer in enumerate(self._held[0])])

    def __len__(self):
        return len(self._held[0])


def _wrapper(executor, *args, **kwargs):
    dm = getattr(executor.class_obj, "diffusion_model", executor.class_obj)    # APPLY_MODEL: the BaseModel
    dm = getattr(dm, "_orig_mod", dm)        # core's TorchCompileModel puts the compiled module there during a call
    to = kwargs.get("transformer_options", args[5] if len(args) > 5 else None) or {}
    if isinstance(dm.layers, _Layers) or not ((to.get("patches_replace") or {}).get("dit")):
        return executor(*args, **kwargs)
    layers = dm.layers
    dm.layers = _Layers(layers)
    try:
        return executor(*args, **kwargs)
    finally:
        dm.layers = layers


def install(m, dm) -> None:
    """Give the clone ``m`` of a Lumina 2 or OmniGen2 model (network ``dm``) block patches, unless its network has its
    own."""
    if not native(dm):
        omnigen = type(dm).__name__.startswith("OmniGen2")
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL if omnigen else pe.WrappersMP.DIFFUSION_MODEL, KEY, _wrapper)
