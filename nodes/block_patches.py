"""Block patches for the DiTs whose forwards do not offer them in ComfyUI 0.3.64: Lumina Image 2.0 (NextDiT) and
OmniGen2 (main layers), HiDream-I1 / E1 (double- and single-stream blocks), Cosmos-Predict2 and PixArt-alpha / Sigma
(blocks).

ComfyUI's DiTs hand each block to ``transformer_options["patches_replace"]["dit"][key]`` when a node has put a
replacement there; these networks loop over their block lists instead (NextDiT: ``for layer in self.layers: x =
layer(x, mask, freqs_cis, adaln_input, transformer_options=...)``). For the forwards of a model that carries such
replacements, a DIFFUSION_MODEL wrapper (OmniGen2, whose forward calls none: APPLY_MODEL; PixArt, whose forward
calls none either and hands its blocks no options: APPLY_MODEL, the options from nodes/pixart_options.py) puts
stand-ins for the block lists in place (and the network's own back afterwards): iterating one gives, per block, a
callable that hands the block to its replacement with the arguments and the ``original_block`` ComfyUI's own DiTs
use:

* Lumina 2 / OmniGen2 layer i, as Flux's single blocks: key ("double_block", i), ``{"img", "vec", "pe",
  "attn_mask"}`` -> ``{"img"}``;
* HiDream double-stream block i, as Flux's double blocks: ("double_block", i), ``{"img", "txt", "vec", "pe",
  "attn_mask"}`` -> ``{"img", "txt"}`` (``txt``: T5, the last Llama layer and this block's Llama layer); single-stream
  block i: ("single_block", i), ``{"img", "vec", "pe", "attn_mask"}`` -> ``{"img"}`` on the joined stream, image
  first;
* Cosmos-Predict2 block i, as Wan's blocks: ("double_block", i), ``{"img", "txt", "vec", "pe", "adaln_lora",
  "extra_pos_emb"}`` -> ``{"img"}``;
* PixArt block i, as Wan's blocks: ("double_block", i), ``{"img", "txt", "vec", "attn_mask", "hw"}`` -> ``{"img"}``
  (``txt``: the batch's embedded captions, joined into one row as PixArt's cross-attention takes them).

(all with ``transformer_options``; a keyword a later ComfyUI's loop adds reaches the block as it is). The blocks are
the network's own modules (their weights, LoRA-patched or not, are not copied), so only the loops change. When a
replacement skips its block (a block cache's cached step), the attention calls the block would have made (two in a
Cosmos or PixArt block, one elsewhere) are reported (attention_chain.skipped), so the call numbering of PAG and NASA
on these networks keeps counting the blocks after it as their own.
"""
from __future__ import annotations

import inspect

import torch

import comfy.patcher_extension as pe

from . import attention_chain, pixart_options

KEY = "trainfree_block_patches"


def native(dm) -> bool:
    """Whether the network's forward already hands its blocks to block patches (a later ComfyUI)."""
    try:
        return "patches_replace" in inspect.getsource(getattr(type(dm), "_forward", type(dm).forward))
    except (OSError, TypeError, AttributeError):
        return False


def _hand(key, calls, args, block):
    """Hand a block to the replacement for ``key`` (``args`` its inputs, ``block(args)`` its outputs), or run it."""
    to = args["transformer_options"]
    patch = ((to.get("patches_replace") or {}).get("dit") or {}).get(key)
    if patch is None:
        return block(args)
    ran = [False]

    def original(a):
        ran[0] = True
        return block(a)
    out = patch(args, {"original_block": original})
    if not ran[0]:
        attention_chain.skipped(to, calls)
    return out


def _layer(i, layer):
    """Lumina 2 / OmniGen2 main layer i."""
    def run(x, mask, freqs_cis, adaln_input, transformer_options=None, **later):
        args = {"img": x, "vec": adaln_input, "pe": freqs_cis, "attn_mask": mask,
                "transformer_options": transformer_options if transformer_options is not None else {}}
        return _hand(("double_block", i), 1, args, lambda a: {"img": layer(
            a["img"], a["attn_mask"], a["pe"], a["vec"], transformer_options=a["transformer_options"], **later)})["img"]
    return run


def _hidream(kind):
    def make(i, block):
        """HiDream double- or single-stream block i (``text_tokens`` None in the single-stream ones)."""
        def run(image_tokens, image_tokens_masks=None, text_tokens=None, adaln_input=None, rope=None,
                transformer_options=None, **later):
            args = {"img": image_tokens, "vec": adaln_input, "pe": rope, "attn_mask": image_tokens_masks,
                    "transformer_options": transformer_options if transformer_options is not None else {}}
            if kind == "double":
                args["txt"] = text_tokens

            def call(a):
                out = block(image_tokens=a["img"], image_tokens_masks=a["attn_mask"], text_tokens=a.get("txt"),
                            adaln_input=a["vec"], rope=a["pe"], transformer_options=a["transformer_options"], **later)
                return {"img": out[0], "txt": out[1]} if kind == "double" else {"img": out}
            out = _hand((f"{kind}_block", i), 1, args, call)
            return (out["img"], out["txt"]) if kind == "double" else out["img"]
        return run
    return make


def _cosmos(i, block):
    """Cosmos-Predict2 block i (a self- and a cross-attention)."""
    def run(x, emb, crossattn_emb, rope_emb_L_1_1_D=None, adaln_lora_B_T_3D=None, extra_per_block_pos_emb=None,
            transformer_options=None, **later):
        args = {"img": x, "txt": crossattn_emb, "vec": emb, "pe": rope_emb_L_1_1_D, "adaln_lora": adaln_lora_B_T_3D,
                "extra_pos_emb": extra_per_block_pos_emb,
                "transformer_options": transformer_options if transformer_options is not None else {}}
        return _hand(("double_block", i), 2, args, lambda a: {"img": block(
            a["img"], a["vec"], a["txt"], rope_emb_L_1_1_D=a["pe"], adaln_lora_B_T_3D=a["adaln_lora"],
            extra_per_block_pos_emb=a["extra_pos_emb"], transformer_options=a["transformer_options"], **later)})["img"]
    return run


def _pixart(i, block):
    """PixArt block i (a self- and a cross-attention); the forward's options come from nodes/pixart_options.py."""
    def run(x, y, t, mask=None, HW=None, **later):
        args = {"img": x, "txt": y, "vec": t, "attn_mask": mask, "hw": HW,
                "transformer_options": pixart_options.current()}
        return _hand(("double_block", i), 2, args, lambda a: {"img": block(
            a["img"], a["txt"], a["vec"], a["attn_mask"], a["hw"], **later)})["img"]
    return run


# the network's block lists by class name, each with the callable that hands its block i over
LISTS = {"NextDiT": (("layers", _layer),), "OmniGen2Transformer2DModel": (("layers", _layer),),
         "HiDreamImageTransformer2DModel": (("double_stream_blocks", _hidream("double")),
                                            ("single_stream_blocks", _hidream("single"))),
         "MiniTrainDIT": (("blocks", _cosmos),), "PixArtMS": (("blocks", _pixart),)}


def lists(dm) -> tuple:
    for cls in type(dm).__mro__:
        if cls.__name__ in LISTS:
            return LISTS[cls.__name__]
    raise ValueError(f"block patches: no block lists known for {type(dm).__name__}")


class _Blocks(torch.nn.Module):
    """Stands in for one of the network's block lists for one forward (a module, as the network's attribute must
    be); the network's list is held outside the module tree, so the state dict does not change."""

    def __init__(self, blocks, make):
        super().__init__()
        self._held = (blocks, make)

    def __iter__(self):
        blocks, make = self._held
        return iter([make(i, block) for i, block in enumerate(blocks)])

    def __len__(self):
        return len(self._held[0])


def _options(args, kwargs) -> dict:
    """The forward's transformer_options: a keyword, or its last positional dict (HiDream's forward, apply_model)."""
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"] or {}
    return next((a for a in reversed(args) if isinstance(a, dict)), None) or {}


def _wrapper(executor, *args, **kwargs):
    dm = getattr(executor.class_obj, "diffusion_model", executor.class_obj)    # APPLY_MODEL: the BaseModel
    dm = getattr(dm, "_orig_mod", dm)        # core's TorchCompileModel puts the compiled module there during a call
    names = lists(dm)
    if isinstance(getattr(dm, names[0][0]), _Blocks) or not ((_options(args, kwargs).get("patches_replace") or {})
                                                            .get("dit")):
        return executor(*args, **kwargs)
    held = {name: getattr(dm, name) for name, _ in names}
    try:
        for name, make in names:
            setattr(dm, name, _Blocks(held[name], make))
        return executor(*args, **kwargs)
    finally:
        for name, blocks in held.items():
            setattr(dm, name, blocks)


def install(m, dm) -> None:
    """Give the clone ``m`` of a Lumina 2, OmniGen2, HiDream, Cosmos-Predict2 or PixArt model (network ``dm``) block
    patches, unless its network has its own."""
    if not native(dm):
        lists(dm)
        pixart = pixart_options.is_pixart(dm)
        if pixart:
            pixart_options.install(m)
        around = pixart or type(dm).__name__.startswith("OmniGen2")
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL if around else pe.WrappersMP.DIFFUSION_MODEL, KEY, _wrapper)
