"""NASA (negative-away steer attention) as a MODEL patch: UNets via attn2 replace, DiTs via block patches (HiDream,
Cosmos-Predict2, Lumina 2, PixArt: a wrapper and an attention override).

UNet: an ``attn2`` replace on every cross-attention layer (chaining any earlier replace, which then
computes Z+); the negative prompt's keys and values come from the layer's own ``to_k``/``to_v`` at run
time (LoRA-patched weights included). DiTs (Flux, Chroma, SD3, Qwen-Image, Wan, LTX-Video, HunyuanVideo,
AuraFlow): block patches that carry the negative as extra text tokens or context, in nodes/nasa_dit.py. HiDream-I1 /
E1, whose forward calls no block patches: a DIFFUSION_MODEL wrapper appends the negative's T5 and Llama tokens to the
network's inputs, an attention override splits every joint attention, in nodes/nasa_hidream.py. Cosmos-Predict2, the
same: the negative's T5 features appended to the context, every cross-attention split, in nodes/nasa_cosmos.py.
Lumina Image 2.0 (NextDiT), the same: the negative's tokens appended to the caption, the rotary positions after the
prompt's tokens moved back by the negative's length, every attention split, in nodes/nasa_lumina.py; OmniGen2, whose
network follows it, the same from an APPLY_MODEL wrapper, in nodes/nasa_omnigen2.py. PixArt-alpha / Sigma (the
paper's own family): as Cosmos-Predict2, from an APPLY_MODEL wrapper, in nodes/nasa_cosmos.py.
"""
from __future__ import annotations

import logging

import torch

import comfy.ldm.aura.mmdit as aura_model
import comfy.ldm.chroma.model as chroma_model
import comfy.ldm.cosmos.predict2 as cosmos_model
import comfy.ldm.flux.model as flux_model
import comfy.ldm.hidream.model as hidream_model
import comfy.ldm.hunyuan_video.model as hunyuan_model
import comfy.ldm.lightricks.model as ltxv_model
import comfy.ldm.lumina.model as lumina_model
import comfy.ldm.omnigen.omnigen2 as omnigen_model
import comfy.ldm.pixart.pixartms as pixart_model
import comfy.ldm.modules.attention as attention
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.ldm.qwen_image.model as qwen_model
import comfy.ldm.wan.model as wan_model
import comfy.ldm.wan.model_animate as wan_animate
import comfy.patcher_extension as pe

from ..guidance import nasa as nasa_math
from ..guidance.pag import sigma_gate
from . import nasa_cosmos, nasa_hidream, nasa_lumina, nasa_omnigen2
from .nasa_dit import patch_dit

PAPER = ("Nguyen et al., SNOOPI: Supercharged One-step Diffusion Distillation with Proper Guidance "
         "(arXiv 2412.02687)")
log = logging.getLogger("trainfree")


class _Negative:
    """The negative prompt tensor, cast once per device/dtype for a run; ``release`` drops that copy (on a GPU it
    sits in VRAM, where ComfyUI's unloading of the model never reaches it)."""

    def __init__(self, tensor):
        self.tensor, self.cache = tensor, {}

    def get(self, device, dtype):
        key = (str(device), dtype)
        if key not in self.cache:
            self.cache = {key: self.tensor.to(device=device, dtype=dtype)}
        return self.cache[key]

    def release(self):
        self.cache = {}


class _Window:
    """start/end percent as sigmas of the model_sampling of the run (read when sampling starts, so a
    ModelSamplingSD3 / shift node placed after NASA counts, as it does for ComfyUI's own percent windows).
    Its OUTER_SAMPLE wrapper also releases the negative's device copy when the run ends (or fails)."""

    def __init__(self, start_percent, end_percent, model_sampling, *negatives):
        self.percents = (float(start_percent), float(end_percent))
        self.negatives = negatives
        self.use(model_sampling)

    def use(self, model_sampling):
        self.sigma_start, self.sigma_end = (float(model_sampling.percent_to_sigma(p)) for p in self.percents)

    def outer_sample(self, executor, *args, **kwargs):
        self.use(executor.class_obj.model_patcher.get_model_object("model_sampling"))
        try:
            return executor(*args, **kwargs)
        finally:
            for negative in self.negatives:
                negative.release()

    def rows(self, to, batch, device):
        """(batch,) bool: the rows of a forward NASA steers (conditional chunks, at a sigma inside the window)."""
        rows = nasa_math.cond_rows(to.get("cond_or_uncond"), batch, device)
        sig = to.get("sigmas")
        if sig is not None:
            gate = sigma_gate(sig.reshape(-1), self.sigma_start, self.sigma_end).to(device)
            rows = rows & (gate if gate.numel() == batch else gate[:1].expand(batch))
        return rows


def _negative_rows(neg, rows, batch, n_chunks):
    """One negative row per selected row: a batch-1 negative for all, else item i of each chunk gets row i."""
    if neg.shape[0] == 1:
        return neg
    per = batch // max(n_chunks, 1)
    idx = (torch.arange(batch, device=neg.device) % per)[rows.to(neg.device)] % neg.shape[0]
    return neg[idx]


def unet_cross_attention_layers(dm):
    out = []
    for name, module in dm.named_modules():
        if isinstance(module, attention.BasicTransformerBlock) and getattr(module, "attn2", None) is not None \
                and ".transformer_blocks." in name:
            parts = name.split(".")
            kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}.get(parts[0])
            if kind is not None:
                idx = 0 if kind == "middle" else int(parts[1])
                out.append(((kind, idx, int(parts[parts.index("transformer_blocks") + 1])), module.attn2))
    return out


def _unet_replace(attn2, prev, neg, alpha, window):
    def replace(q, k, v, extra_options):
        heads, prec = extra_options["n_heads"], extra_options.get("attn_precision")

        def attend(q_, k_, v_):
            return attention.optimized_attention(q_, k_, v_, heads, attn_precision=prec)

        attend_pos = (lambda q_, k_, v_: prev(q_, k_, v_, extra_options)) if prev is not None else attend
        rows = window.rows(extra_options, q.shape[0], q.device)
        if not bool(rows.any()):
            return attend_pos(q, k, v)
        ctx = _negative_rows(neg.get(q.device, q.dtype), rows, q.shape[0], len(extra_options.get("cond_or_uncond") or [0]))
        return nasa_math.cross_nasa_attention(q, k, v, attn2.to_k(ctx), attn2.to_v(ctx), alpha, rows, attend, attend_pos)
    return replace


class TrainFreeNASA:
    DESCRIPTION = ("NASA, negative-away steer attention: a negative prompt for 1-4 step distilled models run at cfg 1. "
                   "In every cross-attention layer the attention to the negative prompt is subtracted: "
                   "Z = Attn(Q, K+, V+) - alpha Attn(Q, K-, V-); no extra model call. UNets (SD1.x, SD2.x, SDXL and "
                   "their one-step/LCM/Lightning/DMD2 distillations), Flux, Chroma, SD3, Qwen-Image, "
                   "HunyuanVideo / HunyuanImage 2.1, AuraFlow, HiDream-I1 / E1 (joint attention: the negative tokens "
                   "ride along as extra text tokens the prompt never sees), Wan (text-to-video, image-to-video, "
                   "VACE), LTX-Video, Cosmos-Predict2, Lumina Image 2.0, OmniGen2 and PixArt-alpha / Sigma (the "
                   f"paper's own family, e.g. its one-step PixArt-alpha distillation). From {PAPER}.")
    CATEGORY = "trainfree/guidance"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the negative prompt applied in cross-attention; sample it at cfg 1.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch: a UNet (SD1.x/SD2.x/SDXL family), Flux, Chroma, SD3, "
                                           "Qwen-Image, Wan (text-to-video, image-to-video, VACE), LTX-Video, "
                                           "HunyuanVideo, HunyuanImage 2.1, AuraFlow, HiDream-I1 / E1, "
                                           "Cosmos-Predict2, Lumina Image 2.0, OmniGen2 or PixArt-alpha / Sigma. "
                                           "Place it after other nodes "
                                           "that replace cross-attention (IPAdapter); it chains."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (from the same text encoder as the positive). "
                                                     "The paper uses a generic 'worst quality, low quality, ...'."}),
            "alpha": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 2.0, "step": 0.01,
                                "tooltip": "Strength alpha of the negative attention subtracted. Paper: 0.1 on SD1.5-"
                                           "based, 0.2 on SD2.1-based, 0.5 on PixArt-alpha models. 0 = off."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Start of the sampling range where NASA is applied (the paper "
                                                   "applies it at every step of 1-4 step sampling)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "End of the sampling range where NASA is applied."}),
        }}

    def patch(self, model, negative, alpha, start_percent=0.0, end_percent=1.0):
        dm = model.get_model_object("diffusion_model")
        arch, want = _architecture(dm)
        if start_percent > end_percent:
            raise ValueError(f"NASA: start_percent ({start_percent}) is after end_percent ({end_percent})")
        if not negative or negative[0][0].ndim != 3:
            raise ValueError("NASA: the negative input must be a text CONDITIONING (tokens x features)")
        if len(negative) > 1:
            log.warning("trainfree: NASA uses the first of %d negative conditioning entries", len(negative))
        neg_t = negative[0][0]
        m = model.clone()
        if neg_t.shape[-1] != want:
            raise ValueError(f"NASA: the negative conditioning has {neg_t.shape[-1]} features per token, this model's "
                             f"text input takes {want}: encode it with this model's text encoder")
        if float(alpha) == 0.0:
            return (m,)
        if arch in ("lumina2", "omnigen2"):
            nasa_lumina.check_negative(negative[0])
        neg, alpha = _Negative(neg_t), float(alpha)
        neg_llama = _Negative(nasa_hidream.check_negative(dm, negative[0])) if arch == "hidream" else None
        window = _Window(start_percent, end_percent, model.get_model_object("model_sampling"),
                         *(n for n in (neg, neg_llama) if n is not None))
        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "trainfree_nasa", window.outer_sample)
        if arch == "hidream":            # its Llama features ride along with the T5 tokens
            nasa_hidream.patch(m, dm, neg, neg_llama, alpha, window)
            return (m,)
        if arch in ("cosmos_predict2", "pixart"):
            nasa_cosmos.patch(m, dm, neg, alpha, window)
            return (m,)
        if arch in ("lumina2", "omnigen2"):
            (nasa_lumina if arch == "lumina2" else nasa_omnigen2).patch(m, dm, neg, alpha, window)
            return (m,)
        existing = m.model_options["transformer_options"].get("patches_replace", {})
        if arch == "unet":
            attn2_existing = existing.get("attn2", {})
            for key, attn2 in unet_cross_attention_layers(dm):
                prev = attn2_existing.get(key, attn2_existing.get(key[:2]))
                m.set_model_attn2_replace(_unet_replace(attn2, prev, neg, alpha, window), *key)
            return (m,)
        patch_dit(m, arch, dm, neg, negative[0], alpha, window, existing.get("dit", {}))
        return (m,)


_WAN = (wan_model.WanModel, wan_model.VaceWanModel, wan_model.CameraWanModel, wan_model.HumoWanModel,
        wan_animate.AnimateWanModel)


def _architecture(dm):
    """(family, features per token of the text input) or a ValueError naming what is supported."""
    if isinstance(dm, openaimodel.UNetModel):
        layers = unet_cross_attention_layers(dm)
        if not layers:
            raise ValueError("NASA: this UNet has no cross-attention layers (not a text-conditioned model)")
        return "unet", layers[0][1].to_k.in_features
    if type(dm) is flux_model.Flux:
        if any(getattr(b, "flipped_img_txt", False) for b in dm.double_blocks):
            raise ValueError("NASA: this Flux variant puts image tokens first; not supported")
        return "flux", dm.txt_in.in_features
    if isinstance(dm, chroma_model.Chroma):          # and Chroma Radiance
        return "chroma", dm.txt_in.in_features
    if isinstance(dm, qwen_model.QwenImageTransformer2DModel):
        return "qwen_image", dm.txt_in.in_features
    if isinstance(dm, ltxv_model.LTXVModel):
        return "ltxv", dm.caption_projection.linear_1.in_features
    if isinstance(dm, hunyuan_model.HunyuanVideo):   # also HunyuanImage 2.1
        return "hunyuan_video", dm.txt_in.input_embedder.in_features
    if isinstance(dm, mmdit.MMDiT):
        if getattr(dm, "context_processor", None) is not None or not hasattr(dm.context_embedder, "in_features"):
            raise ValueError("NASA: this MMDiT variant processes its text context before the blocks; not supported")
        return "sd3", dm.context_embedder.in_features
    if isinstance(dm, aura_model.MMDiT):             # AuraFlow (Pony V7)
        return "auraflow", dm.cond_seq_linear.in_features
    if isinstance(dm, hidream_model.HiDreamImageTransformer2DModel):   # I1 (Full, Dev, Fast), E1
        return "hidream", dm.caption_projection[-1].linear.in_features
    if isinstance(dm, cosmos_model.MiniTrainDIT):    # Cosmos-Predict2 text-to-image, video-to-world
        return "cosmos_predict2", dm.blocks[0].cross_attn.k_proj.in_features
    if isinstance(dm, lumina_model.NextDiT):        # Lumina Image 2.0
        return "lumina2", dm.cap_embedder[-1].in_features
    if isinstance(dm, omnigen_model.OmniGen2Transformer2DModel):
        return "omnigen2", dm.time_caption_embed.caption_embedder[-1].in_features
    if isinstance(dm, pixart_model.PixArtMS):        # PixArt-alpha / Sigma (and one-step distillations of them)
        return "pixart", dm.y_embedder.y_proj.fc1.in_features
    if type(dm) is wan_model.WanModel_S2V:
        raise ValueError("NASA: Wan speech-to-video (S2V) is not supported: ComfyUI's S2V network does not hand its "
                         "blocks the transformer options that carry NASA's attention change")
    if type(dm) in _WAN:    # t2v, i2v (2.1: CLIP tokens; 2.2), FLF2V, VACE, camera control, HuMo, Animate
        if not isinstance(dm.blocks[0].cross_attn, (wan_model.WanT2VCrossAttention, wan_model.WanI2VCrossAttention)):
            raise ValueError(f"NASA: this Wan model's cross-attention ({type(dm.blocks[0].cross_attn).__name__}) is "
                             "not supported")
        return "wan", dm.text_embedding[0].in_features
    raise ValueError(f"NASA (TrainFree) supports UNet models (SD1.x, SD2.x, SDXL), Flux, Chroma, SD3, Qwen-Image, "
                     f"Wan (text-to-video, image-to-video, VACE, camera control, HuMo, Animate), LTX-Video, "
                     f"HunyuanVideo, AuraFlow, HiDream, Cosmos-Predict2, Lumina 2, OmniGen2 and PixArt; this model's "
                     f"network is {type(dm).__name__}.")


NODES = {"TrainFreeNASA": (TrainFreeNASA, "NASA negative prompt at cfg 1 (TrainFree)")}
DROPDOWN = {}
