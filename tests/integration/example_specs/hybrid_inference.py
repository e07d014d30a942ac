"""Example workflow for hybrid base -> distilled inference: two checkpoints, one GUIDER, SamplerCustomAdvanced."""

SOCKETS = {
    "TrainFreeHybridGuider": ([("base_model", "MODEL"), ("distilled_model", "MODEL"), ("positive", "CONDITIONING"),
                               ("negative", "CONDITIONING")], [("GUIDER", "GUIDER")]),
}
NOTE = ("Hybrid inference: the first step is sampled by the base model (SDXL, CFG 5), the remaining three by its "
        "distilled version (SDXL-Turbo, no CFG), which brings back the base model's variety of compositions at "
        "nearly Turbo speed. Schedule the sigmas for the distilled model. Works for any base/distilled pair of one "
        "family (SDXL + Lightning/DMD2/LCM, Flux-dev + Flux-schnell); other pairs are refused.")


def _graph(b):
    specs = [
        (1, "CheckpointLoaderSimple", ["sd_xl_base_1.0.safetensors"], (20, 100)),
        (13, "CheckpointLoaderSimple", ["sd_xl_turbo_1.0_fp16.safetensors"], (20, 400)),
        (2, "CLIPTextEncode", ["a watercolor painting of a lighthouse on a cliff at sunset, detailed"], (400, 60)),
        (3, "CLIPTextEncode", ["blurry, low quality, watermark"], (400, 300)),
        (4, "EmptyLatentImage", [1024, 1024, 1], (400, 540)),
        (5, "KSamplerSelect", ["euler_ancestral"], (800, 60)),
        (6, "BasicScheduler", ["sgm_uniform", 4, 1.0], (800, 260)),
        (7, "TrainFreeHybridGuider", [5.0, 1.0, 1, 1], (800, 440)),
        (8, "RandomNoise", [0, "fixed"], (800, 700)),
        (9, "SamplerCustomAdvanced", [], (1180, 200)),
        (10, "VAEDecode", [], (1500, 200)),
        (11, "SaveImage", ["trainfree_hybrid_inference"], (1740, 200)),
        (12, "Note", [NOTE], (20, 700)),
    ]
    wires = [(1, 1, 2, "clip"), (1, 1, 3, "clip"), (13, 0, 6, "model"), (1, 0, 7, "base_model"),
             (13, 0, 7, "distilled_model"), (2, 0, 7, "positive"), (3, 0, 7, "negative"), (8, 0, 9, "noise"),
             (7, 0, 9, "guider"), (5, 0, 9, "sampler"), (6, 0, 9, "sigmas"), (4, 0, 9, "latent_image"),
             (9, 0, 10, "samples"), (13, 2, 10, "vae"), (10, 0, 11, "images")]
    return b._assemble(specs, wires)


GRAPHS = {"hybrid_inference": _graph}
