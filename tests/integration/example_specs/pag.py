"""Example workflow for TrainFreePAG: checkpoint -> PAG patch -> plain KSampler (CFG 4 + PAG 3, as the paper)."""

SOCKETS = {"TrainFreePAG": ([("model", "MODEL")], [("MODEL", "MODEL")])}

NOTE = ("Perturbed-Attention Guidance on chosen layers: one extra model call per step with the self-attention of "
        "the chosen layers replaced by the identity; the result is pushed away from it. Paper defaults: scale 3 "
        "with CFG 4 (scale 5 at cfg 1), SD1.5/SDXL layer middle.0 (empty 'layers' = that default; DiTs: the block "
        "at half depth). Layers: input.N / middle.0 / output.N (UNet), double.N / single.N (Flux, Chroma, "
        "HunyuanVideo, AuraFlow, HiDream), joint.N (SD3), block.N (Wan, Qwen-Image, LTX-Video, Lumina 2, "
        "Cosmos-Predict2, OmniGen2, PixArt).")


def _graph(b):
    return b.build_patch("TrainFreePAG", [3.0, "", 0.0, 1.0], 25, 4.0, "euler", NOTE, "trainfree_pag")


GRAPHS = {"pag": _graph}
ARCHS = {"pag": ["sd15", "sdxl", "sd3", "flux", "chroma", "qwen_image", "ltxv", "hunyuan_video", "wan_i2v",
                 "wan_vace", "wan22", "lumina2", "auraflow", "hidream", "cosmos_predict2", "omnigen2", "pixart",
                 "pixart_sigma"]}
