"""Example workflows for LinearAG: calibrate once (then reuse the file), patch the model, plain KSampler."""

SOCKETS = {
    "TrainFreeLinearAGCalibrate": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                    ("latent_image", "LATENT")], [("TRAINFREE_LINEAR_AG", "TRAINFREE_LINEAR_AG")]),
    "TrainFreeLinearAGLoad": ([], [("TRAINFREE_LINEAR_AG", "TRAINFREE_LINEAR_AG")]),
    "TrainFreeLinearAG": ([("model", "MODEL"), ("coefficients", "TRAINFREE_LINEAR_AG")], [("MODEL", "MODEL")]),
}
FILE = "sd15_linear_ag_20steps"
CALIBRATE_NOTE = ("LinearAG: the Calibrate node samples its latent's batch (here 8) with plain CFG once and fits, per "
                  "step, how the negative prompt's prediction follows from the positive one and the previous steps "
                  f"(saved to models/trainfree/linear_ag/{FILE}; later runs reuse it). The LinearAG node then skips "
                  "every other negative-prompt evaluation in the first half, and Adaptive Guidance skips them once "
                  "both agree. Sample with the calibrated steps, scheduler and CFG. The console logs what was saved.")
LOAD_NOTE = ("LinearAG with coefficients calibrated earlier (run linear_ag_calibrate_and_sample once first). The "
             "node refuses coefficients of another model or another step count / scheduler.")


def _graph(b, load, note, prefix):
    specs = [
        (1, "CheckpointLoaderSimple", ["v1-5-pruned-emaonly-fp16.safetensors"], (20, 200)),
        (2, "CLIPTextEncode", ["a watercolor painting of a lighthouse on a cliff at sunset, detailed"], (400, 60)),
        (3, "CLIPTextEncode", ["blurry, low quality, watermark"], (400, 300)),
        (4, "EmptyLatentImage", [512, 512, 1], (400, 540)),
        (6, "TrainFreeLinearAG", [0.0, 0.5], (800, 540)),
        (7, "TrainFreeAdaptiveGuidance", [0.9999], (800, 700)),
        (9, "KSampler", [0, "fixed", 20, 7.5, "euler", "normal", 1.0], (1180, 200)),
        (10, "VAEDecode", [], (1520, 200)),
        (11, "SaveImage", [prefix], (1760, 200)),
        (8 if load else 12, "Note", [note], (20, 520)),     # ids stay 1..len(specs)
    ]
    wires = [(1, 1, 2, "clip"), (1, 1, 3, "clip"), (1, 0, 6, "model"), (5, 0, 6, "coefficients"), (6, 0, 7, "model"),
             (7, 0, 9, "model"), (2, 0, 9, "positive"), (3, 0, 9, "negative"), (4, 0, 9, "latent_image"),
             (9, 0, 10, "samples"), (1, 2, 10, "vae"), (10, 0, 11, "images")]
    if load:
        specs.append((5, "TrainFreeLinearAGLoad", [FILE + ".safetensors"], (400, 760)))
    else:
        specs.append((5, "TrainFreeLinearAGCalibrate", [20, 7.5, "euler", "normal", 2, 0, "fixed", FILE, False, 0,
                                                        10000, True], (400, 760)))
        specs.append((8, "EmptyLatentImage", [512, 512, 8], (20, 760)))
        wires += [(1, 0, 5, "model"), (2, 0, 5, "positive"), (3, 0, 5, "negative"), (8, 0, 5, "latent_image")]
    return b._assemble(specs, wires)


GRAPHS = {
    "linear_ag_calibrate_and_sample": lambda b: _graph(b, False, CALIBRATE_NOTE, "trainfree_linear_ag"),
    "linear_ag_load_and_sample": lambda b: _graph(b, True, LOAD_NOTE, "trainfree_linear_ag_load"),
}
FOR_TEST = {"TrainFreeLinearAGCalibrate": {"overwrite": True}}
LOADERS = {"TrainFreeLinearAGLoad": "linear_ag_calibrate_and_sample.json"}
