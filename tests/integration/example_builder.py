"""Writes example_workflows/*.json (UI format, loadable in ComfyUI as shipped).

    python tests/integration/example_builder.py

Each workflow is the classic SD1.5 text-to-image graph sampled by SamplerCustomAdvanced with one
TrainFree node as its SAMPLER. The integration tests run every file through ComfyUI's executor.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "example_workflows"

# node type -> (socket inputs [(name, type)], outputs [(name, type)])
SOCKETS = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "BasicScheduler": ([("model", "MODEL")], [("SIGMAS", "SIGMAS")]),
    "CFGGuider": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                  [("GUIDER", "GUIDER")]),
    "RandomNoise": ([], [("NOISE", "NOISE")]),
    "SamplerCustomAdvanced": ([("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                               ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
                              [("output", "LATENT"), ("denoised_output", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "Note": ([], []),
    "TrainFreeDPMSolverV3Calibrate": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                       ("latent_image", "LATENT")], [("TRAINFREE_EMS", "TRAINFREE_EMS")]),
    "TrainFreeDPMSolverV3Sampler": ([("ems", "TRAINFREE_EMS")], [("SAMPLER", "SAMPLER")]),
    "TrainFreeDPMSolverV3Load": ([], [("TRAINFREE_EMS", "TRAINFREE_EMS")]),
    "TrainFreeDCSolverSearch": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("latent_image", "LATENT")], [("TRAINFREE_DC_RATIOS", "TRAINFREE_DC_RATIOS")]),
    "TrainFreeDCSolverSampler": ([("dc_ratios", "TRAINFREE_DC_RATIOS")], [("SAMPLER", "SAMPLER")]),
    "TrainFreeDCSolverLoad": ([], [("TRAINFREE_DC_RATIOS", "TRAINFREE_DC_RATIOS")]),
    "KSamplerSelect": ([], [("SAMPLER", "SAMPLER")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "TrainFreeAdaptiveGuidance": ([("model", "MODEL")], [("MODEL", "MODEL")]),
    "TrainFreeAdaptiveGuidanceGuider": ([("model", "MODEL"), ("positive", "CONDITIONING"),
                                         ("negative", "CONDITIONING")], [("GUIDER", "GUIDER")]),
    "TrainFreeScheduleSearch": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("latent_image", "LATENT"), ("sampler", "SAMPLER")], [("SIGMAS", "SIGMAS")]),
}

EXAMPLES = {
    "ghvb_sampler": ("TrainFreeGHVBSampler", [3.5], 15, 7.5,
                     "GHVB (Generalized Heavy Ball) sampler. 'order' r = k - 1 + beta: lower is more stable at "
                     "high CFG / few steps, higher is more accurate. Also in KSampler's list as trainfree_ghvb (r = 3.5)."),
    "plms_heavy_ball_sampler": ("TrainFreePLMSHeavyBallSampler", [4, 0.9], 15, 7.5,
                                "PLMS + heavy-ball momentum. beta 0.9 at CFG 7.5, 0.8 at 15, 0.6 at 22.5. "
                                "Also in KSampler's list as trainfree_plms_hb."),
    "dpmpp_2m_heavy_ball_sampler": ("TrainFreeDPMPP2MHeavyBallSampler", [0.8], 15, 7.5,
                                    "DPM-Solver++(2M) + heavy-ball momentum (beta 0.8). Also in KSampler's list "
                                    "as trainfree_dpmpp_2m_hb."),
    "time_shift_ddim_sampler": ("TrainFreeTimeShiftDDIMSampler", [80, 300, 0.0], 10, 7.5,
                                "Time-shift DDIM: the model is asked about the noise level the sample looks like. "
                                "window / cutoff in model timesteps (of 1000). Also in KSampler's list as "
                                "trainfree_ts_ddim."),
    "time_shift_dpmpp_2m_sampler": ("TrainFreeTimeShiftDPMPP2MSampler", [30, 300, 0.0], 10, 7.5,
                                    "Time-shift DPM-Solver++(2M). Also in KSampler's list as trainfree_ts_dpmpp_2m."),
    "dpm_solver_v3_calibrate_and_sample": (
        "TrainFreeDPMSolverV3Sampler", [2, False, "full", True], 6, 7.5,
        "DPM-Solver-v3: the Calibrate node measures the model's statistics once (minutes to an hour on a GPU, "
        "5 x samples x grid points model calls) and saves them to models/trainfree/dpm_solver_v3; later runs "
        "load the file. Calibrate at the CFG you sample with. Best at 5-10 steps.", "calibrate"),
    "dpm_solver_v3_load_and_sample": (
        "TrainFreeDPMSolverV3Sampler", [2, False, "full", True], 6, 7.5,
        "DPM-Solver-v3 with statistics saved earlier by the Calibrate node (run the calibrate_and_sample example "
        "once first). The sampler refuses statistics computed for another model.", "load"),
    "dc_solver_search_and_sample": (
        "TrainFreeDCSolverSampler", [2, "bh2"], 6, 7.5,
        "DC-Solver: the Search node finds compensation ratios for this model on a few samples (its latent's batch) "
        "for each listed step count and CFG, fits the regression for other settings, and saves them to "
        "models/trainfree/dc_solver; later runs load the file. Use the same scheduler when sampling.", "dc_search"),
    "dc_solver_load_and_sample": (
        "TrainFreeDCSolverSampler", [2, "bh2"], 6, 7.5,
        "DC-Solver with ratios saved earlier by the Search node (run the search_and_sample example once first).",
        "dc_load"),
    "schedule_search": (
        "KSamplerSelect", ["dpmpp_2m"], 6, 7.5,
        "Schedule Search: finds where to put the 6 steps for this model, sampler and CFG (on the 16 samples of its "
        "latent), starting from Karras, and caches the result in models/trainfree/schedule_search. Its SIGMAS work "
        "with any sampler node.", "schedule"),
    "adaptive_guidance_guider": (
        "KSamplerSelect", ["dpmpp_2m"], 20, 7.5,
        "Adaptive Guidance as a GUIDER: CFG that stops evaluating the negative prompt once it agrees with the "
        "positive one (threshold 0.9999; paper: 0.991-0.996 on SD). The console logs the evaluations saved.",
        "ag_guider"),
}
EXTRA = {  # extra node feeding the sampler: (type, widgets, sampler input, takes model/prompts/latent)
    "calibrate": ("TrainFreeDPMSolverV3Calibrate", [7.5, 64, 32, 30, "per channel (any resolution)", 0, "fixed",
                                                    "sd15_cfg7.5", False], "ems", True),
    "load": ("TrainFreeDPMSolverV3Load", ["sd15_cfg7.5.safetensors"], "ems", False),
    "dc_search": ("TrainFreeDCSolverSearch", ["normal", "5,6,8,10", "7.5", 10, 0, "fixed", "sd15_dc", False],
                  "dc_ratios", True),
    "dc_load": ("TrainFreeDCSolverLoad", ["sd15_dc.safetensors"], "dc_ratios", False),
}
SCHEDULE = ("TrainFreeScheduleSearch", [6, 7.5, "karras", 60, 60, 0, "fixed", "sd15_dpmpp_2m_6steps", False])


def build(sampler_type, sampler_widgets, steps, cfg, note, prefix, extra=None):
    specs = [  # (id, type, widgets, pos)
        (1, "CheckpointLoaderSimple", ["v1-5-pruned-emaonly-fp16.safetensors"], (20, 200)),
        (2, "CLIPTextEncode", ["a watercolor painting of a lighthouse on a cliff at sunset, detailed"], (400, 60)),
        (3, "CLIPTextEncode", ["blurry, low quality, watermark"], (400, 300)),
        (4, "EmptyLatentImage", [512, 512, 1], (400, 540)),
        (5, sampler_type, sampler_widgets, (800, 60)),
        (6, "BasicScheduler", ["normal", steps, 1.0], (800, 260)),
        (7, "CFGGuider", [cfg], (800, 440)),
        (8, "RandomNoise", [0, "fixed"], (800, 600)),
        (9, "SamplerCustomAdvanced", [], (1180, 200)),
        (10, "VAEDecode", [], (1500, 200)),
        (11, "SaveImage", [prefix], (1740, 200)),
        (12, "Note", [note], (20, 520)),
    ]
    wires = [  # (from id, from slot, to id, to input name)
        (1, 1, 2, "clip"), (1, 1, 3, "clip"), (1, 0, 6, "model"), (1, 0, 7, "model"), (2, 0, 7, "positive"),
        (3, 0, 7, "negative"), (8, 0, 9, "noise"), (7, 0, 9, "guider"), (5, 0, 9, "sampler"),
        (6, 0, 9, "sigmas"), (4, 0, 9, "latent_image"), (9, 0, 10, "samples"), (1, 2, 10, "vae"),
        (10, 0, 11, "images"),
    ]
    if extra == "schedule":   # the searched SIGMAS replace BasicScheduler
        specs[5] = (6, SCHEDULE[0], SCHEDULE[1], (800, 260))
        specs.append((14, "EmptyLatentImage", [512, 512, 16], (20, 760)))
        wires = [w for w in wires if w[2] != 6]
        wires += [(1, 0, 6, "model"), (2, 0, 6, "positive"), (3, 0, 6, "negative"), (14, 0, 6, "latent_image"),
                  (5, 0, 6, "sampler")]
    elif extra == "ag_guider":   # the guider replaces CFGGuider
        specs[6] = (7, "TrainFreeAdaptiveGuidanceGuider", [cfg, 0.9999], (800, 440))
    elif extra:
        node_type, widgets, target, calibrates = EXTRA[extra]
        specs.append((13, node_type, widgets, (400, 760)))
        wires.append((13, 0, 5, target))
        if calibrates:
            specs.append((14, "EmptyLatentImage", [512, 512, 4 if node_type.endswith("Calibrate") else 10], (20, 760)))
            wires += [(1, 0, 13, "model"), (2, 0, 13, "positive"), (3, 0, 13, "negative"), (14, 0, 13, "latent_image")]
    return _assemble(specs, wires)


def _assemble(specs, wires):
    types = {s[0]: s[1] for s in specs}

    def sockets(t):
        return SOCKETS.get(t, ([], [("SAMPLER", "SAMPLER")]))

    links, nodes = [], []
    for link_id, (src, slot, dst, name) in enumerate(wires, start=1):
        links.append([link_id, src, slot, dst, [n for n, _ in sockets(types[dst])[0]].index(name),
                      sockets(types[src])[1][slot][1]])
    for order, (nid, t, widgets, pos) in enumerate(specs):
        ins, outs = sockets(t)
        node = {
            "id": nid, "type": t, "pos": list(pos), "size": [340, 160 if t == "Note" else 100], "flags": {},
            "order": order, "mode": 0,
            "inputs": [{"name": n, "type": ty, "link": next((l[0] for l in links if l[3] == nid and l[4] == i), None)}
                       for i, (n, ty) in enumerate(ins)],
            "outputs": [{"name": n, "type": ty, "slot_index": i,
                         "links": [l[0] for l in links if l[1] == nid and l[2] == i]} for i, (n, ty) in enumerate(outs)],
            "properties": {} if t == "Note" else {"Node name for S&R": t},
            "widgets_values": widgets,
        }
        if t == "Note":
            node["color"], node["bgcolor"] = "#432", "#653"
        nodes.append(node)
    return {"last_node_id": max(s[0] for s in specs), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


PATCHES = {  # MODEL-patch examples: checkpoint -> patch -> plain KSampler
    "adaptive_guidance": ("TrainFreeAdaptiveGuidance", [0.9999], 20, 7.5, "dpmpp_2m",
                          "Adaptive Guidance: stops evaluating the negative prompt once it agrees with the positive "
                          "one. Works with plain KSampler; the console logs how many evaluations were saved. "
                          "Threshold is model-dependent (paper: 0.991-0.996 on SD)."),
}


def build_patch(patch_type, patch_widgets, steps, cfg, sampler, note, prefix):
    specs = [
        (1, "CheckpointLoaderSimple", ["v1-5-pruned-emaonly-fp16.safetensors"], (20, 200)),
        (2, "CLIPTextEncode", ["a watercolor painting of a lighthouse on a cliff at sunset, detailed"], (400, 60)),
        (3, "CLIPTextEncode", ["blurry, low quality, watermark"], (400, 300)),
        (4, "EmptyLatentImage", [512, 512, 1], (400, 540)),
        (5, patch_type, patch_widgets, (400, 760)),
        (9, "KSampler", [0, "fixed", steps, cfg, sampler, "karras", 1.0], (800, 200)),
        (10, "VAEDecode", [], (1180, 200)),
        (11, "SaveImage", [prefix], (1420, 200)),
        (12, "Note", [note], (20, 520)),
    ]
    wires = [(1, 1, 2, "clip"), (1, 1, 3, "clip"), (1, 0, 5, "model"), (5, 0, 9, "model"), (2, 0, 9, "positive"),
             (3, 0, 9, "negative"), (4, 0, 9, "latent_image"), (9, 0, 10, "samples"), (1, 2, 10, "vae"),
             (10, 0, 11, "images")]
    return _assemble(specs, wires)


def main():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import example_specs

    SOCKETS.update(example_specs.collect("SOCKETS"))
    OUT.mkdir(exist_ok=True)
    for name, (t, widgets, steps, cfg, note, *extra) in EXAMPLES.items():
        wf = build(t, widgets, steps, cfg, note, f"trainfree_{name}", *extra)
        (OUT / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
        print("wrote", OUT / f"{name}.json")
    for name, (t, widgets, steps, cfg, sampler, note) in PATCHES.items():
        wf = build_patch(t, widgets, steps, cfg, sampler, note, f"trainfree_{name}")
        (OUT / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
        print("wrote", OUT / f"{name}.json")
    for name, make in example_specs.collect("GRAPHS").items():
        (OUT / f"{name}.json").write_text(json.dumps(make(sys.modules[__name__]), indent=1) + "\n")
        print("wrote", OUT / f"{name}.json")


if __name__ == "__main__":
    main()
