"""Example workflow for TrainFreeNASA: the negative prompt feeds the NASA patch; KSampler runs at cfg 1."""

SOCKETS = {"TrainFreeNASA": ([("model", "MODEL"), ("negative", "CONDITIONING")], [("MODEL", "MODEL")])}

NOTE = ("NASA (negative-away steer attention): a negative prompt for 1-4 step distilled models at cfg 1. Load an "
        "LCM / Lightning / Hyper-SD / DMD2 / Turbo checkpoint (or Flux schnell, SD3.5 Turbo, a distilled Wan, "
        "Qwen-Image with a Lightning LoRA, a distilled Chroma or LTX-Video, HiDream Dev / Fast, HunyuanVideo, which "
        "runs at cfg 1 with its embedded guidance; or PixArt-alpha / Sigma, the paper's own family) here. The "
        "negative prompt enters "
        "through the NASA node, not through CFG: every cross-attention subtracts alpha x the attention to the "
        "negative prompt. alpha: 0.1 (SD1.5-based, paper), 0.2 (SD2.1-based), 0.5 (PixArt). KSampler's negative "
        "input is unused at cfg 1.")


def _graph(b):
    specs = [
        (1, "CheckpointLoaderSimple", ["v1-5-pruned-emaonly-fp16.safetensors"], (20, 200)),
        (2, "CLIPTextEncode", ["a watercolor painting of a lighthouse on a cliff at sunset, detailed"], (400, 60)),
        (3, "CLIPTextEncode", ["worst quality, low quality, blurry, watermark"], (400, 300)),
        (4, "EmptyLatentImage", [512, 512, 1], (400, 540)),
        (5, "TrainFreeNASA", [0.1, 0.0, 1.0], (800, 420)),
        (9, "KSampler", [0, "fixed", 4, 1.0, "lcm", "sgm_uniform", 1.0], (1180, 200)),
        (10, "VAEDecode", [], (1560, 200)),
        (11, "SaveImage", ["trainfree_nasa"], (1800, 200)),
        (12, "Note", [NOTE], (20, 520)),
    ]
    wires = [(1, 1, 2, "clip"), (1, 1, 3, "clip"), (1, 0, 5, "model"), (3, 0, 5, "negative"), (5, 0, 9, "model"),
             (2, 0, 9, "positive"), (3, 0, 9, "negative"), (4, 0, 9, "latent_image"), (9, 0, 10, "samples"),
             (1, 2, 10, "vae"), (10, 0, 11, "images")]
    return b._assemble(specs, wires)


GRAPHS = {"nasa": _graph}
ARCHS = {"nasa": ["sd15", "sdxl", "sd3", "flux", "chroma", "qwen_image", "ltxv", "hunyuan_video", "hunyuan_image",
                  "wan_i2v", "wan_vace", "wan22", "auraflow", "hidream", "cosmos_predict2", "lumina2",
                  "omnigen2", "pixart", "pixart_sigma"]}
