"""Perturbed-Attention Guidance on chosen layers, as a MODEL patch (UNets, SD3, Flux, Chroma, Qwen-Image, Wan,
LTX-Video, HunyuanVideo / HunyuanImage 2.1, AuraFlow; Lumina 2: nodes/pag_lumina.py, HiDream-I1 and Cosmos-Predict2:
nodes/pag_counted.py, OmniGen2: nodes/pag_omnigen2.py, their networks call no block patches).

Like core's PerturbedAttentionGuidance it adds a post-CFG function (a chainable list) that runs one
extra conditional pass with perturbed options; nothing is installed in the model for the normal
passes. UNets: ``attn1`` replace keyed by (block, id[, transformer index]) returning V (core's
mechanism, now on any block). DiTs: a ``patches_replace["dit"]`` block patch, set only in the
perturbed pass's options, calls the previous occupant (or the original block) with
``transformer_options["optimized_attention_override"]`` set for that block; the override chains to
any earlier override for the attention calls it does not perturb. Flux, Chroma and AuraFlow single blocks see one
[txt; img] sequence: the image length is recorded in the perturbed pass (Flux: a ``post_input`` patch; Chroma and
AuraFlow, which have none: a DIFFUSION_MODEL wrapper counting the latent's patches). HunyuanVideo puts the image first,
in its double blocks' joint attention and in the single blocks' [img; txt]; its single blocks take the text length
recorded at the first double block (image tokens vary with its reference-latent and video variants).
"""
from __future__ import annotations

import math
import uuid

import comfy.ldm.aura.mmdit as aura_model
import comfy.ldm.chroma.model as chroma_model
import comfy.ldm.flux.model as flux_model
import comfy.ldm.hunyuan_video.model as hunyuan_model
import comfy.ldm.lightricks.model as ltxv_model
import comfy.ldm.lumina.model as lumina_model
import comfy.ldm.modules.attention as attention
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.ldm.qwen_image.model as qwen_model
import comfy.ldm.wan.model as wan_model
import comfy.model_patcher
import comfy.patcher_extension as pe
import comfy.samplers

from ..guidance import pag as pag_math
from . import dit_layout, pag_counted, pag_lumina, pag_omnigen2

PAPER = "Ahn et al., Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance (ECCV 2024)"
PERTURBED_KEY = "trainfree_perturbed"   # set in transformer_options of the perturbed pass (caches may skip it)
DIT_KEY = {"double": "double_block", "single": "single_block", "joint": "double_block", "block": "double_block"}
KINDS_OF = {"unet": ("input", "middle", "output"), "flux": ("double", "single"), "chroma": ("double", "single"),
            "sd3": ("joint",), "wan": ("block",), "qwen_image": ("block",), "ltxv": ("block",),
            "hunyuan_video": ("double", "single"), "lumina2": ("block",), "auraflow": ("double", "single"),
            "omnigen2": ("block",), **pag_counted.KINDS_OF}


def architecture(model) -> str:
    dm = model.get_model_object("diffusion_model")
    if isinstance(dm, openaimodel.UNetModel):
        return "unet"
    if type(dm) is flux_model.Flux:
        return "flux"
    if isinstance(dm, chroma_model.Chroma):        # Chroma and Chroma Radiance
        return "chroma"
    if isinstance(dm, mmdit.MMDiT):
        return "sd3"
    if type(dm) is wan_model.WanModel_S2V:
        raise ValueError("Perturbed-Attention Guidance (TrainFree): Wan speech-to-video (S2V) is not supported: "
                         "ComfyUI's S2V network does not hand its blocks the transformer options that carry the "
                         "perturbation, so the guidance would do nothing")
    if isinstance(dm, wan_model.WanModel):      # t2v, i2v, VACE, camera control, HuMo, Animate
        return "wan"
    if isinstance(dm, qwen_model.QwenImageTransformer2DModel):
        return "qwen_image"
    if isinstance(dm, ltxv_model.LTXVModel):
        return "ltxv"
    if isinstance(dm, hunyuan_model.HunyuanVideo):  # also HunyuanImage 2.1
        return "hunyuan_video"
    if isinstance(dm, lumina_model.NextDiT):         # Lumina Image 2.0
        return "lumina2"
    if isinstance(dm, aura_model.MMDiT):             # AuraFlow (Pony V7)
        return "auraflow"
    counted = pag_counted.architecture(dm)          # HiDream-I1, Cosmos-Predict2, PixArt-alpha / Sigma
    if counted is not None:
        return counted
    if pag_omnigen2.is_omnigen2(dm):
        return "omnigen2"
    raise ValueError(f"Perturbed-Attention Guidance (TrainFree) supports UNet models (SD1.x, SD2.x, SDXL), SD3, "
                     f"Flux, Chroma, Qwen-Image, Wan, LTX-Video, HunyuanVideo, Lumina 2, AuraFlow, HiDream, "
                     f"Cosmos-Predict2, OmniGen2 and PixArt; this model's network is {type(dm).__name__}. For other "
                     f"DiTs use core's SkipLayerGuidanceDiT.")


def available_layers(model, arch: str) -> list[tuple[str, int, int | None]]:
    dm = model.get_model_object("diffusion_model")
    if arch == "unet":
        out = []
        for name, module in dm.named_modules():
            if isinstance(module, attention.BasicTransformerBlock) and ".transformer_blocks." in name:
                parts = name.split(".")
                kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}.get(parts[0])
                if kind is None:
                    continue
                idx = 0 if kind == "middle" else int(parts[1])
                out.append((kind, idx, int(parts[parts.index("transformer_blocks") + 1])))
        return out
    if arch in ("flux", "chroma", "hunyuan_video", "auraflow"):
        return [(key.split("_")[0], i, None) for key, i in dit_layout.block_keys(dm)]
    if arch == "sd3":
        return [("joint", i, None) for i in range(len(dm.joint_blocks))]
    if arch in ("qwen_image", "ltxv"):
        return [("block", i, None) for i in range(len(dm.transformer_blocks))]
    if arch in ("lumina2", "omnigen2"):
        return [("block", i, None) for i in range(len(dm.layers))]
    if arch in pag_counted.KINDS_OF:
        return pag_counted.available_layers(dm, arch)
    return [("block", i, None) for i in range(len(dm.blocks))]


def default_layers(model, arch: str) -> str:
    """UNet: core's middle block. DiTs: the block at half the network's depth (no paper default exists)."""
    if arch == "unet":
        return "middle.0"
    layers = available_layers(model, arch)
    return pag_math.format_layer(layers[len(layers) // 2])


_perturbed_attention = pag_math.perturbed_call     # the attention call replaced (a name the tests spy on)


def _plan(arch, kind, index, flipped, args, img_len_box):
    """For one block call: (call number, query tokens, key tokens) -> image-row function (or None: a pure
    self-attention; or False: leave that attention call alone). Image rows are located by the image token
    count, so a sequence that other patches extend with text tokens (NASA) or call on a sub-sequence is still
    split right, and their extra sub-calls (NASA's negative-text attention) pass through."""
    if arch in ("wan", "ltxv"):                     # self-attention first, then cross-attention(s)
        return lambda call, nq, nk: (lambda n: None) if call == 0 else False
    if arch == "sd3":                               # joint [context; x], then (MMDiT-X) x-only self-attention
        i = args["img"].shape[1]
        return lambda call, nq, nk: (lambda n: (n - i, n)) if call == 0 else (
            (lambda n: None) if nq == nk == i else False)
    if kind == "double" or arch == "qwen_image":   # one joint attention over [txt; img] (Flux: maybe [img; txt])
        i = args["img"].shape[1]
        return lambda call, nq, nk: (lambda n: (0, i) if flipped else (n - i, n)) if call == 0 else False
    if arch == "hunyuan_video":                    # single block: [img; txt]
        t = img_len_box.get("txt")
        return lambda call, nq, nk: (lambda n: (0, n - t)) if call == 0 else False
    i = img_len_box.get("img")                     # single block: [txt; img] as one sequence
    return lambda call, nq, nk: (lambda n: (n - i, n)) if call == 0 else False


def _block_patch(prev, arch, kind, index, flipped, img_len_box):
    def patch(args, extra):
        to = dict(args["transformer_options"])
        earlier = to.get("optimized_attention_override")
        decide = _plan(arch, kind, index, flipped, args, img_len_box)
        calls = [0]

        def override(func, *a, **kw):
            tokens = -2 if kw.get("skip_reshape", False) else 1
            rows = decide(calls[0], a[0].shape[tokens], a[1].shape[tokens])
            calls[0] += 1
            if rows is False:
                return earlier(func, *a, **kw) if earlier is not None else func(*a, **kw)
            return _perturbed_attention(rows, *a, **kw)

        to["optimized_attention_override"] = override
        new_args = dict(args, transformer_options=to)
        return prev(new_args, extra) if prev is not None else extra["original_block"](new_args)
    return patch


def perturbed_conds(conds):
    """The conds with their uuid replaced by one derived from it: caches keyed by cond uuid (EasyCache, LazyCache)
    then keep the perturbed prediction apart from the conditional one instead of overwriting its cache."""
    return [dict(c, uuid=uuid.uuid5(c["uuid"], "trainfree-pag")) if isinstance(c.get("uuid"), uuid.UUID) else c
            for c in conds]


def flipped_blocks(model) -> frozenset:
    """Indices of the Flux double blocks that put the image tokens first (``flipped_img_txt``)."""
    dm = model.get_model_object("diffusion_model")
    return frozenset(i for i, b in enumerate(getattr(dm, "double_blocks", ())) if getattr(b, "flipped_img_txt", False))


def perturbed_options(model_options, arch, layers, flipped=frozenset(), counts=None):
    """A copy of model_options whose forward perturbs ``layers``; the original is not modified. ``flipped``: the
    model's ``flipped_blocks``, ``counts`` its ``pag_lumina.layer_counts`` (Lumina 2), ``pag_omnigen2.layer_counts``
    (OmniGen2) or ``pag_counted.layout`` (HiDream, Cosmos-Predict2, PixArt), read once when patching: the post-CFG
    function must not hold its own ModelPatcher, a reference cycle that would keep the whole model alive after
    ComfyUI drops it."""
    opts = model_options.copy()
    if arch == "unet":
        for kind, idx, t in layers:
            opts = comfy.model_patcher.set_model_options_patch_replace(
                opts, pag_math.identity_attention, "attn1", kind, idx, t)
        opts["transformer_options"][PERTURBED_KEY] = "pag"
        return opts
    to = opts["transformer_options"] = dict(opts["transformer_options"])
    to[PERTURBED_KEY] = "pag"
    if arch == "lumina2":                           # no block patches: attention calls numbered per forward
        pag_lumina.perturb(to, counts, [idx for _, idx, _ in layers])
        return opts
    if arch in pag_counted.KINDS_OF:                 # the same on HiDream, Cosmos-Predict2 and PixArt
        pag_counted.perturb(to, arch, counts, layers)
        return opts
    if arch == "omnigen2":                           # and on OmniGen2, around apply_model
        pag_omnigen2.perturb(to, counts, [idx for _, idx, _ in layers])
        return opts
    replace = to["patches_replace"] = dict(to.get("patches_replace", {}))
    dit = replace["dit"] = dict(replace.get("dit", {}))
    box, single = {}, any(k == "single" for k, _, _ in layers)
    if single and arch == "flux":                   # the image length the single blocks see
        patches = to["patches"] = dict(to.get("patches", {}))

        def record(io):
            box["img"] = io["img"].shape[1]
            return io
        patches["post_input"] = list(patches.get("post_input", [])) + [record]
    elif single and arch in ("chroma", "auraflow"):   # one token per latent patch

        def count_patches(executor, x, *args, **kwargs):
            p = executor.class_obj.patch_size
            box["img"] = math.ceil(x.shape[-2] / p) * math.ceil(x.shape[-1] / p)
            return executor(x, *args, **kwargs)
        wrappers = to["wrappers"] = dict(to.get("wrappers", {}))
        around = wrappers[pe.WrappersMP.DIFFUSION_MODEL] = dict(wrappers.get(pe.WrappersMP.DIFFUSION_MODEL, {}))
        around["trainfree_pag"] = list(around.get("trainfree_pag", [])) + [count_patches]
    for kind, idx, _ in layers:
        key = (DIT_KEY[kind], idx)
        dit[key] = _block_patch(dit.get(key), arch, kind, idx, kind == "double" and idx in flipped, box)
    if single and arch == "hunyuan_video":         # the text length, recorded at double block 0
        dit[("double_block", 0)] = _record_txt(dit.get(("double_block", 0)), box)
    return opts


def _record_txt(prev, box):
    def patch(args, extra):
        box["txt"] = args["txt"].shape[1]
        return prev(args, extra) if prev is not None else extra["original_block"](args)
    return patch


class TrainFreePAG:
    DESCRIPTION = ("Perturbed-Attention Guidance on the layers you choose: one extra conditional pass per step with "
                   "the self-attention of those layers replaced by the identity, and the result pushed away from it: "
                   "D = CFG + scale (D_cond - D_perturbed). Works with CFG or at cfg 1, with plain KSampler and "
                   "SamplerCustomAdvanced, and chains with other patches. UNets (SD1.x/SDXL), SD3, Flux, Chroma, "
                   "Qwen-Image, Wan, LTX-Video, HunyuanVideo, Lumina 2, AuraFlow, HiDream, Cosmos-Predict2, "
                   "OmniGen2 and PixArt-alpha / Sigma; on "
                   f"DiTs with joint text-image attention only the image-image part is perturbed. From {PAPER}.")
    CATEGORY = "trainfree/guidance"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with Perturbed-Attention Guidance (one extra model call per guided step).",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch (UNet, SD3, Flux, Chroma, Qwen-Image, Wan, "
                                          "LTX-Video, HunyuanVideo, Lumina 2, AuraFlow, HiDream, Cosmos-Predict2, "
                                          "OmniGen2 or PixArt; chains with other patches)."}),
            "scale": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01, "round": 0.01,
                                "tooltip": "PAG scale s. Paper/official defaults: 3.0 together with CFG (4.0), 5.0 at "
                                           "cfg 1. 0 = off (no extra model call)."}),
            "layers": ("STRING", {"default": "", "multiline": False,
                                  "tooltip": "Self-attention layers to perturb, comma separated. Empty = default: "
                                             "'middle.0' on UNets (the paper's mid block, as core's node), the block "
                                             "at half depth on DiTs. UNet: input.N, middle.0, output.N (add .T for one "
                                             "transformer of that block); Flux, Chroma, HunyuanVideo, AuraFlow, "
                                             "HiDream: double.N, single.N; SD3: joint.N; Wan, Qwen-Image, LTX-Video, "
                                             "Lumina 2, Cosmos-Predict2, OmniGen2, PixArt: block.N; ranges like "
                                             "double.2-4. "
                                             "Unknown names are refused with the list of valid ones."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Start of the sampling range where PAG is applied (0 = first step). "
                                                   "The paper guides every step."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "End of the sampling range where PAG is applied (1 = last step)."}),
        }}

    def patch(self, model, scale, layers="", start_percent=0.0, end_percent=1.0):
        arch = architecture(model)
        if start_percent > end_percent:
            raise ValueError(f"PAG: start_percent ({start_percent}) is after end_percent ({end_percent})")
        spec = pag_math.parse_layers(layers if layers.strip() else default_layers(model, arch))
        allowed = KINDS_OF[arch]
        wrong = [pag_math.format_layer(ly) for ly in spec if ly[0] not in allowed]
        if wrong:
            raise ValueError(f"PAG: layer(s) {', '.join(wrong)} do not apply to this {arch} model; it takes "
                             f"{', '.join(k + '.N' for k in allowed)}")
        if arch != "unet" and any(t is not None for _, _, t in spec):
            raise ValueError("PAG: a transformer index (kind.N.T) exists on UNets only")
        available = available_layers(model, arch)
        pag_math.validate_layers(spec, available)
        if arch == "unet":   # exact (block, id, transformer) keys: they win over an earlier replace keyed so
            spec = [a for a in available if any(a[:2] == ly[:2] and ly[2] in (None, a[2]) for ly in spec)]
        scale = float(scale)
        flipped = frozenset()
        if arch == "flux":
            flipped = flipped_blocks(model)
        elif arch == "hunyuan_video":               # image tokens first in every double block
            flipped = frozenset(range(len(model.get_model_object("diffusion_model").double_blocks)))
        dm = model.get_model_object("diffusion_model")
        counts = pag_lumina.layer_counts(dm) if arch == "lumina2" else \
            pag_omnigen2.layer_counts(dm) if arch == "omnigen2" else \
            pag_counted.layout(dm, arch) if arch in pag_counted.KINDS_OF else None
        m = model.clone()

        def post_cfg_function(args):
            denoised = args["denoised"]
            if scale == 0.0:
                return denoised
            sigma, inner = args["sigma"], args["model"]
            ms = inner.model_sampling
            gate = pag_math.sigma_gate(sigma, float(ms.percent_to_sigma(start_percent)),
                                       float(ms.percent_to_sigma(end_percent)))
            if not bool(gate.any()):
                return denoised
            opts = perturbed_options(args["model_options"], arch, spec, flipped, counts)
            (perturbed,) = comfy.samplers.calc_cond_batch(inner, [perturbed_conds(args["cond"])], args["input"], sigma,
                                                          opts)
            return pag_math.combine(denoised, args["cond_denoised"], perturbed, scale,
                                    None if bool(gate.all()) else gate)

        m.set_model_sampler_post_cfg_function(post_cfg_function)
        return (m,)


NODES = {"TrainFreePAG": (TrainFreePAG, "Perturbed-Attention Guidance, chosen layers (TrainFree)")}
DROPDOWN = {}
