"""NASA (negative-away steer attention) as a MODEL patch: UNets via attn2 replace, Flux via block patches.

UNet: an ``attn2`` replace on every cross-attention layer (chaining any earlier replace, which then
computes Z+); the negative prompt's keys and values come from the layer's own ``to_k``/``to_v`` at run
time (LoRA-patched weights included). Flux: a ``post_input`` patch (a list) appends the negative
prompt, through the model's own ``txt_in``, as extra text tokens, and a ``patches_replace["dit"]``
patch on every double and single block (chaining earlier ones) sets an attention override for that
block that keeps the positive stream blind to those tokens (see guidance/nasa.py).
"""
from __future__ import annotations

import logging

import torch

import comfy.ldm.flux.model as flux_model
import comfy.ldm.modules.attention as attention
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

from ..guidance import nasa as nasa_math
from ..guidance.pag import sigma_gate

PAPER = ("Nguyen et al., SNOOPI: Supercharged One-step Diffusion Distillation with Proper Guidance "
         "(arXiv 2412.02687)")
log = logging.getLogger("trainfree")


class _Negative:
    """The negative prompt tensor, cast once per device/dtype."""

    def __init__(self, tensor):
        self.tensor, self.cache = tensor, {}

    def get(self, device, dtype):
        key = (str(device), dtype)
        if key not in self.cache:
            self.cache = {key: self.tensor.to(device=device, dtype=dtype)}
        return self.cache[key]


def _rows(to, batch, device, sigma_start, sigma_end):
    rows = nasa_math.cond_rows(to.get("cond_or_uncond"), batch, device)
    sig = to.get("sigmas")
    if sig is not None:
        gate = sigma_gate(sig.reshape(-1), sigma_start, sigma_end).to(device)
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


def _unet_replace(attn2, prev, neg, alpha, sigma_start, sigma_end):
    def replace(q, k, v, extra_options):
        heads, prec = extra_options["n_heads"], extra_options.get("attn_precision")

        def attend(q_, k_, v_):
            return attention.optimized_attention(q_, k_, v_, heads, attn_precision=prec)

        attend_pos = (lambda q_, k_, v_: prev(q_, k_, v_, extra_options)) if prev is not None else attend
        rows = _rows(extra_options, q.shape[0], q.device, sigma_start, sigma_end)
        if not bool(rows.any()):
            return attend_pos(q, k, v)
        ctx = _negative_rows(neg.get(q.device, q.dtype), rows, q.shape[0], len(extra_options.get("cond_or_uncond") or [0]))
        return nasa_math.cross_nasa_attention(q, k, v, attn2.to_k(ctx), attn2.to_v(ctx), alpha, rows, attend, attend_pos)
    return replace


def _flux_block_patch(prev, neg_len, box, alpha, sigma_start, sigma_end):
    def patch(args, extra):
        to = dict(args["transformer_options"])
        earlier = to.get("optimized_attention_override")

        def override(func, *a, **kw):
            if kw.get("mask") is not None:
                raise RuntimeError("NASA (TrainFree) on Flux does not support attention masks in the conditioning")
            q, k, v = a[:3]
            heads = a[3] if len(a) > 3 else kw.pop("heads")
            if not kw.get("skip_reshape", False):
                q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
            want_heads_out = kw.get("skip_output_reshape", False)
            sub = dict(kw, skip_reshape=True, skip_output_reshape=True)

            def attend(q_, k_, v_):
                return earlier(func, q_, k_, v_, heads, **sub) if earlier is not None else func(q_, k_, v_, heads, **sub)

            rows = _rows(to, q.shape[0], q.device, sigma_start, sigma_end)
            out = nasa_math.joint_nasa_attention(q, k, v, box["t_pos"], neg_len, alpha, rows, attend)
            if want_heads_out:
                return out
            b, h, n, d = out.shape
            return out.transpose(1, 2).reshape(b, n, h * d)

        to["optimized_attention_override"] = override
        new_args = dict(args, transformer_options=to)
        return prev(new_args, extra) if prev is not None else extra["original_block"](new_args)
    return patch


def _flux_post_input(dm, neg, box):
    def post_input(io):
        txt = io["txt"]
        box["t_pos"] = txt.shape[1]
        extra = dm.txt_in(neg.get(txt.device, txt.dtype))
        extra = extra.expand(txt.shape[0], -1, -1) if extra.shape[0] == 1 else \
            extra[torch.arange(txt.shape[0], device=txt.device) % extra.shape[0]]
        out = dict(io, txt=torch.cat([txt, extra], dim=1))
        ids = io.get("txt_ids")
        if ids is not None:
            out["txt_ids"] = torch.cat([ids, torch.zeros(ids.shape[0], extra.shape[1], *ids.shape[2:],
                                                         dtype=ids.dtype, device=ids.device)], dim=1)
        return out
    return post_input


class TrainFreeNASA:
    DESCRIPTION = ("NASA, negative-away steer attention: a negative prompt for 1-4 step distilled models run at cfg 1. "
                   "In every cross-attention layer the attention to the negative prompt is subtracted: "
                   "Z = Attn(Q, K+, V+) - alpha Attn(Q, K-, V-); no extra model call. UNets (SD1.x, SD2.x, SDXL and "
                   "their one-step/LCM/Lightning/DMD2 distillations) and Flux (joint attention: the negative tokens "
                   f"ride along as extra text tokens the prompt never sees). From {PAPER}.")
    CATEGORY = "trainfree/guidance"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the negative prompt applied in cross-attention; sample it at cfg 1.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch: a UNet (SD1.x/SD2.x/SDXL family) or Flux. Place it "
                                           "after other nodes that replace cross-attention (IPAdapter); it chains."}),
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
        if isinstance(dm, openaimodel.UNetModel):
            arch = "unet"
        elif type(dm) is flux_model.Flux:
            arch = "flux"
        else:
            raise ValueError(f"NASA (TrainFree) supports UNet models (SD1.x, SD2.x, SDXL) and Flux; this model's "
                             f"network is {type(dm).__name__}. (SD3 and Wan are not supported yet.)")
        if start_percent > end_percent:
            raise ValueError(f"NASA: start_percent ({start_percent}) is after end_percent ({end_percent})")
        if not negative or negative[0][0].ndim != 3:
            raise ValueError("NASA: the negative input must be a text CONDITIONING (tokens x features)")
        if len(negative) > 1:
            log.warning("trainfree: NASA uses the first of %d negative conditioning entries", len(negative))
        neg_t = negative[0][0]
        m = model.clone()
        if arch == "unet":
            layers = unet_cross_attention_layers(dm)
            if not layers:
                raise ValueError("NASA: this UNet has no cross-attention layers (not a text-conditioned model)")
            want = layers[0][1].to_k.in_features
        else:
            if any(getattr(b, "flipped_img_txt", False) for b in dm.double_blocks):
                raise ValueError("NASA: this Flux variant puts image tokens first; not supported")
            want = dm.txt_in.in_features
        if neg_t.shape[-1] != want:
            raise ValueError(f"NASA: the negative conditioning has {neg_t.shape[-1]} features per token, this model's "
                             f"text input takes {want}: encode it with this model's text encoder")
        if float(alpha) == 0.0:
            return (m,)
        ms = model.get_model_object("model_sampling")
        s_start, s_end = float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent))
        neg, alpha = _Negative(neg_t), float(alpha)
        existing = m.model_options["transformer_options"].get("patches_replace", {})
        if arch == "unet":
            attn2_existing = existing.get("attn2", {})
            for key, attn2 in layers:
                prev = attn2_existing.get(key, attn2_existing.get(key[:2]))
                m.set_model_attn2_replace(_unet_replace(attn2, prev, neg, alpha, s_start, s_end), *key)
            return (m,)
        box = {}
        m.set_model_patch(_flux_post_input(dm, neg, box), "post_input")
        dit = existing.get("dit", {})
        for kind, count in (("double_block", len(dm.double_blocks)), ("single_block", len(dm.single_blocks))):
            for i in range(count):
                m.set_model_patch_replace(_flux_block_patch(dit.get((kind, i)), neg_t.shape[1], box, alpha, s_start,
                                                            s_end), "dit", kind, i)
        return (m,)


NODES = {"TrainFreeNASA": (TrainFreeNASA, "NASA negative prompt at cfg 1 (TrainFree)")}
DROPDOWN = {}
