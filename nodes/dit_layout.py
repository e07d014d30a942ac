"""The blocks of ComfyUI's Flux-layout DiTs (double-stream blocks, then single-stream blocks on the joined stream):
Flux, Chroma, HunyuanVideo and AuraFlow, keyed as their ``patches_replace["dit"]`` entries are."""
from __future__ import annotations


def double_single(dm) -> tuple[int, int]:
    """(double-stream blocks, single-stream blocks) of the network ``dm`` (AuraFlow names its lists
    ``double_layers`` / ``single_layers``)."""
    if hasattr(dm, "double_layers"):
        return len(dm.double_layers), len(dm.single_layers)
    return len(dm.double_blocks), len(dm.single_blocks)


def block_keys(dm) -> list[tuple[str, int]]:
    """Every block's ``patches_replace["dit"]`` key, in the order the forward runs them."""
    doubles, singles = double_single(dm)
    return [("double_block", i) for i in range(doubles)] + [("single_block", i) for i in range(singles)]


def hidream_image_tokens(patch: int, x, image_cond=None) -> int:
    """The image tokens of every HiDream attention call: the latent ``x`` (with an edit model's ``image_cond`` joined
    on its width) in patches of ``patch``."""
    width = x.shape[-1] + (image_cond.shape[-1] if image_cond is not None else 0)
    return -(-x.shape[-2] // patch) * -(-width // patch)
