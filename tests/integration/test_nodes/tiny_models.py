"""Tiny, randomly initialised diffusion models built from ComfyUI's own classes.

They use the real ``comfy.supported_models`` configs, ``BaseModel`` subclasses, model_sampling
(EPS + discrete schedule for SD1.5/SDXL, CONST flow for SD3/Flux/Wan) and ``ModelPatcher``: every
hook, wrapper and patch a node installs runs exactly as with a real checkpoint. They build in
milliseconds and sample an 8x8 latent in a fraction of a second on one CPU thread.

"wan" is a Wan 2.1 text-to-video DiT: its latent is 5-D ``[B, 16, T, H, W]`` (``LATENT_DIMS``), as are those of
"wan_i2v" (Wan 2.1 image-to-video: 36 input channels, the image's CLIP-vision tokens in every cross-attention),
"wan_vace" (Wan 2.1 VACE: one control block beside block 0, fed an empty control video unless the conditioning
holds one), "qwen_image" (T = 1), "hunyuan_video" and "ltxv" (128 channels); "chroma_radiance" works in pixel space
(3 channels); "hunyuan_image" (HunyuanImage 2.1) has 64 channels and patch size 1; "lumina2" is Lumina Image 2.0's
NextDiT (a Gemma text encoder with a padding mask; ComfyUI 0.3.64 gives it no block patches). Wan variants:
"wan_camera" (2.1 camera control: wan_i2v's cross-attention, camera embeddings added after the patch embedding),
"wan_humo" (HuMo 1.7B: an attention over audio tokens after the text cross-attention), "wan_animate" (2.2 Animate,
no face input), "wan_s2v" (2.2 speech-to-video, no audio: its blocks get no transformer options) and "wan22" (Wan 2.2
TI2V 5B: Wan 2.1's network on a 48-channel latent; its image-to-video fixes the first frame with a noise mask, and
ComfyUI then gives each frame its own timestep). ``OTHER_DITS``:
"auraflow" (AuraFlow / Pony V7: Flux-like double and single blocks behind register tokens), "hidream" (HiDream-I1:
a T5 context and stacked Llama layers' features, ``conditioning_llama3``), "cosmos_predict2" (Cosmos-Predict2
text-to-image: EDM sigmas, a 5-D latent of one frame), "omnigen2" (OmniGen2), "pixart" (PixArt-alpha: a linear
beta schedule, sigma_max about 157; self- and cross-attention blocks; size micro-conditions; its latents 40 x 40,
``SMALLEST``) and "pixart_sigma" (PixArt-Sigma: no micro-conditions, SDXL's latent); Mochi was left out (its
blocks assert their full width). "svd" is Stable Video Diffusion's video U-Net (EDM v-prediction; the batch is the
frames; the prompt is one CLIP-vision token and the start image's latent, concatenated to the input).

``VARIANTS`` are UNets built as their base arch with one of core's model sampling nodes applied: "sd15_v" (SD2.x-style
v-prediction) and "sdxl_vzsnr" (v-prediction with zero terminal SNR, as the v-pred SDXL finetunes; its sigma_max is
about 4500 instead of 14.6), with ModelSamplingDiscrete; "sdxl_edm" (Playground v2.5: EDM preconditioning, sigma_data
0.5, continuous sigmas 0.002 to 80, its own latent format), with ModelSamplingContinuousEDM.
"""
from __future__ import annotations

import torch

# DiT families that not every family-specific node (PAG, NASA, the caches) supports: what runs there, what is refused
OTHER_DITS = ("auraflow", "hidream", "cosmos_predict2", "omnigen2", "pixart", "pixart_sigma")
ARCHS = ("sd15", "sdxl", "sd3", "flux", "wan", "chroma", "chroma_radiance", "qwen_image", "hunyuan_video", "hunyuan_image",
         "ltxv", "wan_i2v", "wan_vace", "lumina2", "wan_camera", "wan_humo", "wan_animate", "wan_s2v", "wan22",
         *OTHER_DITS, "svd")
WAN_VARIANTS = ("wan_camera", "wan_humo", "wan_animate", "wan_s2v")
# spatial (and temporal) dimensions of each arch's latent, after batch and channels
LATENT_DIMS = {"sd15": 2, "sdxl": 2, "sd3": 2, "flux": 2, "wan": 3, "chroma": 2, "chroma_radiance": 2, "qwen_image": 3,
               "hunyuan_video": 3, "hunyuan_image": 2, "ltxv": 3, "wan_i2v": 3, "wan_vace": 3, "lumina2": 2, "wan22": 3,
               **{a: 3 for a in WAN_VARIANTS}, "auraflow": 2, "hidream": 2, "cosmos_predict2": 3, "omnigen2": 2,
               "pixart": 2, "pixart_sigma": 2, "svd": 2}
# the smallest latents ComfyUI's network of a family takes, where 8 x 8 is too small: PixArt's position embedding
# divides by its base size, round(latent side / 64) * 64 / patch, which is 0 below a side of 33 (real PixArt latents:
# 64 and up)
SMALLEST = {"pixart": (40, 40), "pixart_sigma": (40, 40)}
PIXELS = {arch: 8 * max(size) for arch, size in SMALLEST.items()}   # the EmptyLatentImage side that gives it
# frames of the 5-D latents the tests sample (Qwen-Image, an image model, keeps a frame axis of 1)
FRAMES = {"wan": 2, "ltxv": 2, "qwen_image": 1, "hunyuan_video": 1, "wan_i2v": 2, "wan_vace": 2, "wan22": 2,
          **{a: 2 for a in WAN_VARIANTS}, "cosmos_predict2": 1}
# name: (base arch, the sampling core's node applies) of the variants
VARIANTS = {"sd15_v": ("sd15", "v_prediction"), "sdxl_vzsnr": ("sdxl", "v_prediction zsnr"),
            "sdxl_edm": ("sdxl", "edm_playground_v2.5")}
CHOICES = ARCHS + tuple(VARIANTS)
# (context tokens, context dim, pooled dim) the conditioning must have for each arch (Chroma reads no pooled
# vector but, built on Flux, its conditioning must carry one)
COND_SHAPES = {"sd15": (77, 64, None), "sdxl": (77, 64, 32), "sd3": (77, 64, 32), "flux": (16, 64, 32),
               "wan": (16, 64, None), "wan22": (16, 64, None), "chroma": (16, 64, 32), "chroma_radiance": (16, 64, 32),
               "qwen_image": (16, 64, None), "ltxv": (16, 64, None),
               "hunyuan_video": (16, 64, 32), "hunyuan_image": (16, 64, None), "wan_i2v": (16, 64, None),
               "wan_vace": (16, 64, None), "lumina2": (16, 64, None), **{a: (16, 64, None) for a in WAN_VARIANTS},
               "hidream": (16, 64, 32), **{a: (16, 64, None) for a in OTHER_DITS if a != "hidream"},
               "svd": (1, 64, None)}
CLIP_VISION_TOKENS = 4          # wan_i2v: the image's CLIP-vision tokens (257 x 1280 in the real model)

_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 64, "use_temporal_resblock": False, "use_temporal_attention": False,
}


def _config(arch):
    import comfy.supported_models as sm

    if arch == "sd15":
        cfg = sm.SD15(dict(_UNET))
    elif arch == "sdxl":
        cfg = sm.SDXL(dict(_UNET, adm_in_channels=32 + 1536, num_classes="sequential",
                           use_linear_in_transformer=True))
    elif arch == "sd3":
        cfg = sm.SD3({"in_channels": 16, "out_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2,
                      "depth": 2, "input_size": None, "adm_in_channels": 32, "num_patches": 256,
                      "pos_embed_max_size": 16, "x_block_self_attn_layers": [],
                      "context_embedder_config": {"target": "torch.nn.Linear",
                                                  "params": {"in_features": 64, "out_features": 128}}})
    elif arch == "flux":
        cfg = sm.Flux({"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
                       "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
                       "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
                       "qkv_bias": True, "guidance_embed": True})
    elif arch == "wan":
        cfg = sm.WAN21_T2V({"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 16,
                            "in_dim": 16, "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 64,
                            "out_dim": 16, "num_heads": 2, "num_layers": 2, "eps": 1e-6})
    elif arch == "wan22":       # Wan 2.2 TI2V 5B: 48 latent channels (its own VAE), model_base.WAN22
        cfg = sm.WAN22_T2V({"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 16,
                            "in_dim": 48, "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 64,
                            "out_dim": 48, "num_heads": 2, "num_layers": 2, "eps": 1e-6})
    elif arch == "wan_i2v":     # the image enters as 20 extra input channels (mask + latent) and CLIP-vision tokens
        cfg = sm.WAN21_I2V({"image_model": "wan2.1", "model_type": "i2v", "patch_size": (1, 2, 2), "text_len": 16,
                            "in_dim": 36, "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 64,
                            "out_dim": 16, "num_heads": 2, "num_layers": 2, "eps": 1e-6})
    elif arch in WAN_VARIANTS:
        wan = {"image_model": "wan2.1", "patch_size": (1, 2, 2), "text_len": 16, "dim": 64, "ffn_dim": 128,
               "freq_dim": 32, "text_dim": 64, "out_dim": 16, "num_heads": 2, "num_layers": 2, "eps": 1e-6}
        cfg = {"wan_camera": lambda: sm.WAN21_Camera(dict(wan, model_type="camera", in_dim=32)),
               "wan_humo": lambda: sm.WAN21_HuMo(dict(wan, model_type="humo", in_dim=16)),
               "wan_animate": lambda: sm.WAN22_Animate(dict(wan, model_type="animate", in_dim=36)),
               "wan_s2v": lambda: sm.WAN22_S2V(dict(wan, model_type="s2v", in_dim=16, audio_dim=32,
                                                    audio_inject_layers=[0, 1]))}[arch]()
    elif arch == "lumina2":
        cfg = sm.Lumina2({"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 64,
                          "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "qk_norm": True,
                          "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512]})
    elif arch == "wan_vace":    # control video (16 + 16 latent channels) and its mask (64) enter the control blocks
        cfg = sm.WAN21_Vace({"image_model": "wan2.1", "model_type": "vace", "patch_size": (1, 2, 2), "text_len": 16,
                             "in_dim": 16, "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 64, "out_dim": 16,
                             "num_heads": 2, "num_layers": 2, "eps": 1e-6, "vace_layers": 1, "vace_in_dim": 96})
    elif arch == "chroma":      # its modulation approximator takes 64 inputs (16 + 16 + 32) in every size
        cfg = sm.Chroma({"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64,
                         "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
                         "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64,
                         "out_dim": 64, "hidden_dim": 128, "n_layers": 1})
    elif arch == "chroma_radiance":   # pixel space (3 channels), Chroma's blocks, a NeRF-style decoder head
        cfg = sm.ChromaRadiance({"image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3,
                                 "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
                                 "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
                                 "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 128, "n_layers": 1,
                                 "nerf_hidden_size": 16, "nerf_mlp_ratio": 2, "nerf_depth": 1, "nerf_max_freqs": 4,
                                 "nerf_tile_size": 0, "nerf_final_head_type": "conv",
                                 "nerf_embedder_dtype": torch.float32})
    elif arch == "hunyuan_image":       # HunyuanImage 2.1: HunyuanVideo's network on 2-D latents, 2-D rotary
        cfg = sm.HunyuanImage21({"image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64,
                                 "vec_in_dim": None, "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0,
                                 "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [16, 16],
                                 "theta": 256, "patch_size": [1, 1], "qkv_bias": True, "guidance_embed": False,
                                 "byt5": False, "meanflow": False})
    elif arch == "ltxv":                # LTX-Video: 128-channel video latent, one token per latent voxel
        cfg = sm.LTXV({"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
                       "num_attention_heads": 2, "caption_channels": 64, "num_layers": 3})
    elif arch == "hunyuan_video":
        cfg = sm.HunyuanVideo({"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
                               "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
                               "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2],
                               "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False})
    elif arch == "qwen_image":
        cfg = sm.QwenImage({"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
                            "num_layers": 3, "attention_head_dim": 32, "num_attention_heads": 2,
                            "joint_attention_dim": 64, "pooled_projection_dim": 32, "guidance_embeds": False,
                            "axes_dims_rope": (8, 12, 12)})
    elif arch in OTHER_DITS:
        cfg = _other_dit(arch)
    elif arch == "svd":         # SVD image-to-video: a video U-Net (temporal res blocks and attention), EDM v-pred
        cfg = sm.SVD_img2vid(dict(_UNET, adm_in_channels=768, num_classes="sequential", in_channels=8,
                                  use_linear_in_transformer=True, use_temporal_resblock=True,
                                  use_temporal_attention=True, extra_ff_mix_layer=True, use_spatial_context=True,
                                  merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
                                  disable_temporal_crossattention=False, max_ddpm_temb_period=10000))
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; one of {ARCHS}")
    if arch in ("sd15", "sdxl", "svd"):
        cfg.unet_config["num_heads"] = 2
        cfg.unet_config["num_head_channels"] = -1
    return cfg


def _other_dit(arch):
    import comfy.supported_models as sm

    if arch == "auraflow":      # AuraFlow 0.3 (Pony v7): 1 joint + 2 single blocks, register tokens, learned positions
        return sm.AuraFlow({"cond_seq_dim": 64, "max_seq": 64, "n_double_layers": 1, "n_layers": 3, "in_channels": 4,
                            "out_channels": 4, "patch_size": 2, "dim": 64, "n_heads": 2, "global_conddim": 64})
    if arch == "hidream":       # HiDream-I1: T5 context, one Llama layer's features per block, MoE feed-forwards
        return sm.HiDream({"image_model": "hidream", "attention_head_dim": 32, "axes_dims_rope": [16, 8, 8],
                           "caption_channels": [64, 64], "max_resolution": [32, 32], "in_channels": 16,
                           "out_channels": 16, "llama_layers": [0, 1], "num_attention_heads": 2,
                           "num_routed_experts": 2, "num_activated_experts": 1, "num_layers": 1,
                           "num_single_layers": 1, "patch_size": 2, "text_emb_dim": 32})
    if arch == "cosmos_predict2":   # Cosmos-Predict2 text-to-image: EDM sigmas, rectified flow inside (COSMOS_RFLOW)
        return sm.CosmosT2IPredict2({
            "image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
            "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64,
            "concat_padding_mask": True, "crossattn_emb_channels": 64, "pos_emb_cls": "rope3d",
            "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30,
            "use_adaln_lora": True, "adaln_lora_dim": 16, "num_blocks": 2, "num_heads": 2,
            "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
            "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0, "extra_h_extrapolation_ratio": 1.0,
            "extra_w_extrapolation_ratio": 1.0, "extra_t_extrapolation_ratio": 1.0,
            "rope_enable_fps_modulation": False})
    if arch == "omnigen2":      # OmniGen2: Lumina-style refiners and blocks over a Qwen2.5-VL context
        return sm.Omnigen2({"image_model": "omnigen2", "axes_dim_rope": [8, 12, 12], "axes_lens": [300, 512, 512],
                            "ffn_dim_multiplier": None, "hidden_size": 64, "in_channels": 16, "multiple_of": 16,
                            "norm_eps": 1e-5, "num_attention_heads": 2, "num_kv_heads": 1, "num_layers": 2,
                            "num_refiner_layers": 1, "out_channels": None, "patch_size": 2, "text_feat_dim": 64,
                            "timestep_scale": 1000.0})
    if arch == "pixart":        # PixArt-alpha: self-attention, cross-attention to T5, adaLN-single; no block patches
        return sm.PixArtAlpha({"image_model": "pixart_alpha", "input_size": 32, "patch_size": 2, "in_channels": 4,
                               "hidden_size": 96, "depth": 2, "num_heads": 2, "caption_channels": 64,
                               "pe_interpolation": 1.0, "micro_condition": True, "model_max_length": 16})
    if arch == "pixart_sigma":  # PixArt-Sigma: the same network without size micro-conditions, on SDXL's latent
        return sm.PixArtSigma({"image_model": "pixart_sigma", "input_size": 32, "patch_size": 2, "in_channels": 4,
                               "hidden_size": 64, "depth": 2, "num_heads": 2, "caption_channels": 64,
                               "micro_condition": False, "model_max_length": 16})
    raise ValueError(f"unknown tiny arch {arch!r}")


def _tensors(module: torch.nn.Module) -> dict:
    """{(module, "_parameters" or "_buffers", name): dtype} of every tensor of ``module``."""
    return {(m, kind, name): t.dtype for m in module.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items() if t is not None}


def _reinit(module: torch.nn.Module, seed: int) -> None:
    """comfy's layers skip weight init (disable_weight_init): re-run torch's initialisers."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        done = set()
        for m in module.modules():
            for cls in type(m).__mro__:
                if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
                    cls.reset_parameters(m)
                    done.update(id(p) for p in m.parameters(recurse=False))
                    break
        with torch.no_grad():  # custom modules without an initialiser (RMSNorm scale, ...)
            for name, p in module.named_parameters():
                if id(p) in done:
                    continue
                if p.ndim == 1:
                    p.fill_(1.0 if name.endswith(("scale", "weight")) else 0.0)
                else:
                    p.normal_(0.0, 0.02)
            for name, b in module.named_buffers():  # checkpoint-loaded buffers (SD3's pos_embed)
                if name.endswith("pos_embed"):
                    b.normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(gen_state)


def build(arch: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a tiny random model of ``arch`` (one of ``CHOICES``) with weights in ``dtype`` (float16 /
    bfloat16: as ComfyUI runs them on GPUs)."""
    if arch in VARIANTS:
        from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM, ModelSamplingDiscrete

        base, sampling = VARIANTS[arch]
        model = patcher(_config(base), seed, dtype)
        if sampling.startswith("edm"):
            return ModelSamplingContinuousEDM().patch(model, sampling, 80.0, 0.002)[0]
        return ModelSamplingDiscrete().patch(model, "v_prediction", sampling.endswith("zsnr"))[0]
    return patcher(_config(arch), seed, dtype)


def patcher(cfg, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a CPU model (weights in ``dtype``) of the ``comfy.supported_models`` config ``cfg``,
    initialised."""
    import comfy.model_management as mm
    import comfy.model_patcher

    fp8 = dtype == torch.float8_e4m3fn          # stored in fp8, computed in bfloat16 (ComfyUI's manual cast)
    cfg.set_inference_dtype(dtype, torch.bfloat16 if fp8 else None)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    built = {}
    if fp8:                                       # torch's initialisers do not run on fp8 tensors
        built = _tensors(model.diffusion_model)
        model.diffusion_model.float()
    _reinit(model.diffusion_model, seed)
    if type(model.diffusion_model).__module__ == "comfy.ldm.aura.mmdit":   # torch's initialisers leave AuraFlow's
        with torch.no_grad():   # time embedding small and so its blocks' gates near 0.03 (they would barely act):
            model.diffusion_model.t_embedder.mlp[-1].weight.mul_(10.0)              # about 0.3
    with torch.no_grad():   # each tensor back in the dtype the model was built with, as ComfyUI loads fp8 weights:
        for (mod, kind, name), t in built.items():      # buffers made in float32 (Cosmos' rope ranges) stay so
            if kind == "_parameters":
                mod._parameters[name].data = mod._parameters[name].data.to(t)
            else:
                mod._buffers[name] = mod._buffers[name].to(t)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def side(arch: str, size: int) -> int:
    """``size``, or the smallest latent side ``arch``'s network takes where that is larger (``SMALLEST``)."""
    return max(size, *SMALLEST.get(VARIANTS.get(arch, (arch,))[0], (0,)))


def latent_shape(arch: str, batch: int = 1, size=None) -> tuple:
    """The shape of a latent of ``arch`` (its channels; a frame axis where it has one) with spatial ``size`` (default:
    8 x 8, or the smallest one the family takes, ``SMALLEST``)."""
    base = VARIANTS.get(arch, (arch,))[0]
    size = size or SMALLEST.get(base, (8, 8))
    frames = (FRAMES[base],) if base in FRAMES else ()
    return (batch, _config(base).latent_format.latent_channels) + frames + tuple(size)


def conditioning(arch: str, seed: int = 0, batch: int = 1):
    """A CONDITIONING value shaped like the text encoder output ``arch`` expects."""
    arch = VARIANTS.get(arch, (arch,))[0]
    tokens, dim, pooled = COND_SHAPES[arch]
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens, dim, generator=g)
    extra = {}
    if pooled is not None:
        extra["pooled_output"] = torch.randn(batch, pooled, generator=g)
    if arch == "sdxl":
        extra.update(width=64, height=64, crop_w=0, crop_h=0, target_width=64, target_height=64)
    if arch == "svd":           # what SVD_img2vid_Conditioning puts there: the start image's latent (the CLIP-vision
        extra["concat_latent_image"] = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12345))  # embed
    if arch == "hidream":       # the Llama encoder's hidden states of the layers the blocks read, stacked
        extra["conditioning_llama3"] = torch.randn(batch, 2, tokens, dim, generator=g)
    if arch in ("ltxv", "lumina2", "omnigen2"):   # the encoders' padding mask (all real tokens here)
        extra["attention_mask"] = torch.ones(batch, tokens, dtype=torch.long)
    if arch == "wan_camera":    # WanCameraEmbedding's output for an 8x8 latent of 2 frames (24 x 2 x 64 x 64)
        extra["camera_conditions"] = torch.randn(1, 24, 2, 64, 64, generator=torch.Generator().manual_seed(54321))
    if arch == "wan_humo":      # the audio encoder's features of 2 latent frames (8-sample window, 5 layers, 1280)
        extra["audio_embed"] = torch.randn(batch, 2, 8, 5, 1280, generator=torch.Generator().manual_seed(54321))
    if arch in ("wan_i2v", "wan_camera"):   # what WanImageToVideo puts there: CLIPVisionEncode's output of one
        import types            # start image, the same whatever the prompt (no start image latent: zeros)

        image = torch.randn(1, CLIP_VISION_TOKENS, 1280, generator=torch.Generator().manual_seed(12345))
        extra["clip_vision_output"] = types.SimpleNamespace(penultimate_hidden_states=image.expand(batch, -1, -1))
    return [[cond, extra]]
