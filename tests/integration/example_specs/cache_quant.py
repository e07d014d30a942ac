"""Example workflows for the DiT block cache: uniform (no calibration), calibrate-then-sample, load-then-sample."""

_S = "TRAINFREE_CACHE_SCHEDULE"
_PROMPTS = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")]
SOCKETS = {
    "TrainFreeDiTCache": ([("model", "MODEL"), ("schedule", _S)], [("MODEL", "MODEL")]),
    "TrainFreeCacheQuantCalibrate": (_PROMPTS, [(_S, _S)]),
    "TrainFreeCacheQuantLoad": ([], [(_S, _S)]),
}

CKPT = "flux1-dev-fp8.safetensors"
STEPS, CFG, SAMPLER, SCHEDULER = 20, 1.0, "euler", "simple"
NAME = "flux_dev_cache_20steps"
CACHE_NOTE = ("DiT Block Cache (TrainFree), for Flux / Chroma / SD3 / Wan / HunyuanVideo / Qwen-Image / LTX-Video / "
              "AuraFlow / Lumina 2 / OmniGen2 / HiDream / Cosmos-Predict2 / PixArt: the middle transformer blocks run "
              "on every interval-th step only; in between, their stored residual is added instead. After each run the "
              "console and this node show how many evaluations were cached and the measured speed-up. interval 3 is "
              "about 2x on Flux; 2 is gentler. Stacks with guidance patches; refuses EasyCache/LazyCache on the same "
              "model.")
CALIB_NOTE = ("CacheQuant (TrainFree): the Calibrate node samples once with all blocks, then picks which steps run "
              "the blocks by dynamic programming and fits a per-channel correction of the reused residuals. Use the "
              "same steps, cfg, sampler, scheduler and image size as the KSampler. The schedule is saved under "
              f"models/trainfree/cache_quant/{NAME}.safetensors (reused next time; Load it in other workflows). "
              "The cache refuses a schedule made for another model or step count.")
LOAD_NOTE = (f"Loads the CacheQuant schedule saved by the calibrate-and-sample example ({NAME}); it only fits the "
             "model and the step count it was calibrated for.")


def _graph(b, cache_widgets, extra, note, prefix):
    specs = [
        (1, "CheckpointLoaderSimple", [CKPT], (20, 200)),
        (2, "CLIPTextEncode", ["a watercolor painting of a lighthouse on a cliff at sunset, detailed"], (400, 60)),
        (3, "CLIPTextEncode", [""], (400, 300)),
        (4, "EmptyLatentImage", [1024, 1024, 1], (400, 540)),
        (5, "TrainFreeDiTCache", cache_widgets, (800, 560)),
        (9, "KSampler", [0, "fixed", STEPS, CFG, SAMPLER, SCHEDULER, 1.0], (1180, 200)),
        (10, "VAEDecode", [], (1540, 200)),
        (11, "SaveImage", [prefix], (1780, 200)),
        (12, "Note", [note], (20, 560)),
    ]
    wires = [(1, 1, 2, "clip"), (1, 1, 3, "clip"), (1, 0, 5, "model"), (5, 0, 9, "model"), (2, 0, 9, "positive"),
             (3, 0, 9, "negative"), (4, 0, 9, "latent_image"), (9, 0, 10, "samples"), (1, 2, 10, "vae"),
             (10, 0, 11, "images")]
    if extra == "calibrate":
        specs.append((13, "TrainFreeCacheQuantCalibrate", [0, "fixed", STEPS, CFG, SAMPLER, SCHEDULER, 3, 1, 1, True,
                                                           True, NAME, False, 0, 10000, True], (800, 60)))
        wires += [(1, 0, 13, "model"), (2, 0, 13, "positive"), (3, 0, 13, "negative"), (4, 0, 13, "latent_image"),
                  (13, 0, 5, "schedule")]
    elif extra == "load":
        specs.append((13, "TrainFreeCacheQuantLoad", [NAME + ".safetensors"], (800, 60)))
        wires.append((13, 0, 5, "schedule"))
    return b._assemble(specs, wires)


GRAPHS = {
    "dit_cache": lambda b: _graph(b, [3, 1, 1], None, CACHE_NOTE, "trainfree_dit_cache"),
    "cache_quant_calibrate_and_sample": lambda b: _graph(b, [3, 1, 1], "calibrate", CALIB_NOTE,
                                                         "trainfree_cache_quant"),
    "cache_quant_load_and_sample": lambda b: _graph(b, [3, 1, 1], "load", LOAD_NOTE, "trainfree_cache_quant_load"),
}
# the tiny SD3 / Wan / Lumina 2 / OmniGen2 / HiDream / Cosmos-Predict2 / PixArt test models have 2 blocks (the
# others 3 or 4):
# keep the last one in the cached span; calibrate anew per model
FOR_TEST = {"TrainFreeDiTCache": {"head_blocks": 1, "tail_blocks": 0},
            "TrainFreeCacheQuantCalibrate": {"head_blocks": 1, "tail_blocks": 0, "overwrite": True}}
LOADERS = {"TrainFreeCacheQuantLoad": "cache_quant_calibrate_and_sample.json"}
ARCHS = {name: ["flux", "sd3", "wan", "wan_i2v", "wan_vace", "wan22", "chroma", "qwen_image", "hunyuan_video", "ltxv",
                "auraflow", "lumina2", "omnigen2", "hidream", "cosmos_predict2", "pixart", "pixart_sigma"]
         for name in GRAPHS}
