"""The blocks of ComfyUI's DiTs, keyed as their ``patches_replace["dit"]`` entries are: the Flux-layout ones
(double-stream blocks, then single-stream blocks on the joined stream: Flux, Chroma, HunyuanVideo, AuraFlow and
HiDream, whose blocks nodes/block_patches.py hands over), the span of them the DiT Block Cache (nodes/cache_quant.py)
caches, and the image tokens of HiDream's attention calls."""
from __future__ import annotations


def double_single(dm) -> tuple[int, int]:
    """(double-stream blocks, single-stream blocks) of the network ``dm`` (AuraFlow names its lists
    ``double_layers`` / ``single_layers``, HiDream ``double_stream_blocks`` / ``single_stream_blocks``)."""
    if hasattr(dm, "double_layers"):
        return len(dm.double_layers), len(dm.single_layers)
    if hasattr(dm, "double_stream_blocks"):
        return len(dm.double_stream_blocks), len(dm.single_stream_blocks)
    return len(dm.double_blocks), len(dm.single_blocks)


def block_keys(dm) -> list[tuple[str, int]]:
    """Every block's ``patches_replace["dit"]`` key, in the order the forward runs them."""
    doubles, singles = double_single(dm)
    return [("double_block", i) for i in range(doubles)] + [("single_block", i) for i in range(singles)]


def image_tokens(x, refs, p: int) -> int:
    """The image tokens of a forward in patches of ``p``: the latent's ``x`` and the reference latents' ``refs`` (None:
    none), each padded to the patch size as Lumina 2 and OmniGen2 pad them."""
    return sum(-(-t.shape[-2] // p) * -(-t.shape[-1] // p) for t in [x, *(refs or ())])


def hidream_image_tokens(patch: int, x, image_cond=None) -> int:
    """The image tokens of every HiDream attention call: the latent ``x`` (with an edit model's ``image_cond`` joined
    on its width) in patches of ``patch``."""
    width = x.shape[-1] + (image_cond.shape[-1] if image_cond is not None else 0)
    return -(-x.shape[-2] // patch) * -(-width // patch)


def cached_dit_classes() -> dict:
    """ComfyUI's DiT classes the DiT Block Cache knows, by architecture name (a class this ComfyUI lacks is left
    out)."""
    import importlib

    found = {}
    for arch, module, name in (("flux", "comfy.ldm.flux.model", "Flux"), ("chroma", "comfy.ldm.chroma.model", "Chroma"),
                               ("chroma", "comfy.ldm.chroma_radiance.model", "ChromaRadiance"),
                               ("hunyuan_video", "comfy.ldm.hunyuan_video.model", "HunyuanVideo"),
                               ("sd3", "comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper"),
                               ("wan", "comfy.ldm.wan.model", "WanModel"),
                               ("wan", "comfy.ldm.wan.model", "CameraWanModel"),
                               ("wan", "comfy.ldm.wan.model", "HumoWanModel"),
                               ("wan_vace", "comfy.ldm.wan.model", "VaceWanModel"),
                               ("qwen_image", "comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel"),
                               ("ltxv", "comfy.ldm.lightricks.model", "LTXVModel"),
                               ("auraflow", "comfy.ldm.aura.mmdit", "MMDiT"),
                               ("lumina2", "comfy.ldm.lumina.model", "NextDiT"),
                               ("omnigen2", "comfy.ldm.omnigen.omnigen2", "OmniGen2Transformer2DModel"),
                               ("hidream", "comfy.ldm.hidream.model", "HiDreamImageTransformer2DModel"),
                               ("cosmos_predict2", "comfy.ldm.cosmos.predict2", "MiniTrainDIT"),
                               ("pixart", "comfy.ldm.pixart.pixartms", "PixArtMS")):
        try:
            found[getattr(importlib.import_module(module), name)] = arch
        except (ImportError, AttributeError):
            pass
    return found


def dit_span(model, head: int, tail: int):
    """(architecture, the block keys of the cached span) or a ValueError saying why this model can't be cached."""
    dm = model.get_model_object("diffusion_model")
    arch = cached_dit_classes().get(type(dm))
    if arch in ("flux", "chroma", "hunyuan_video", "auraflow", "hidream"):   # double-stream blocks, then
        # single-stream ones on the joined stream ([txt; img], HunyuanVideo's and HiDream's [img; txt])
        keys = block_keys(dm)
    elif arch is not None:                 # one list of joint blocks
        blocks = {"sd3": "joint_blocks", "wan": "blocks", "wan_vace": "blocks", "qwen_image": "transformer_blocks",
                  "ltxv": "transformer_blocks", "lumina2": "layers", "omnigen2": "layers",
                  "cosmos_predict2": "blocks", "pixart": "blocks"}[arch]
        keys = [("double_block", i) for i in range(len(getattr(dm, blocks)))]
    else:
        between = {"AnimateWanModel": "Animate adds its face features", "WanModel_S2V": "speech-to-video adds its "
                   "audio features"}.get(type(dm).__name__)
        variant = ""
        if between:
            variant = f" ({between} between the blocks, computed from the stream a block cache would skip)"
        elif any(c.__name__ == "WanModel" and isinstance(dm, c) for c in cached_dit_classes()):
            variant = f" (a Wan variant, {type(dm).__name__}, this cache has not been tested on)"
        raise ValueError(f"DiT block cache: {type(model.model).__name__} ({type(dm).__name__}) is not supported"
                         f"{variant}; it caches the transformer blocks of Flux, Chroma, SD3/SD3.5, Wan 2.1/2.2 (text- "
                         "and image-to-video, camera control, HuMo, VACE), HunyuanVideo, Qwen-Image, LTX-Video, "
                         "AuraFlow, Lumina 2, OmniGen2, HiDream, Cosmos-Predict2 and PixArt-alpha / Sigma models. "
                         "For SD1.5/SDXL U-Nets use a U-Net cache such as DeepCache.")
    if head + tail >= len(keys):
        raise ValueError(f"DiT block cache: this {arch} model has {len(keys)} blocks; head_blocks + tail_blocks "
                         f"({head} + {tail}) must leave at least one block to cache")
    return arch, keys[head:len(keys) - tail]
