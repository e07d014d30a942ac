"""The pack's MODEL patches stacked with core ComfyUI's own MODEL patches, in both orders.

Core's patches reach the model through the same channels as ours (block and attention patches, object
patches, post-CFG and CFG functions, wrappers, model_sampling), so each pair is a chance to overwrite or
bypass the other. For every pair: the pack's node at its neutral setting gives core's result bit for bit;
at an acting setting it changes that result and still does its work (cached calls, skipped evaluations);
and core's patch still acts next to it (the pair differs from the pack's node alone). Adaptive Guidance
is left out of that last check: at its acting threshold the tiny model's guidance ends at the first step,
so core's CFG functions get nothing to change, as they would on their own at cfg 1.
"""

import pytest

from probes import last_count, run_logged
from prompts import patched_ksampler

CORE = {   # core node -> inputs other than its defaults
    "sd15": {"FreeU_V2": {}, "RescaleCFG": {}, "SelfAttentionGuidance": {}, "PerturbedAttentionGuidance": {},
             "HyperTile": {"tile_size": 32}, "TomePatchModel": {}, "CFGZeroStar": {}, "APG": {}, "Mahiro": {},
             "TCFG": {}, "PatchModelAddDownscale": {"block_number": 2, "end_percent": 0.5,
                                                    "downscale_method": "bicubic", "upscale_method": "bicubic"}},
    "flux": {"SkipLayerGuidanceDiT": {"double_layers": "1", "single_layers": "1", "start_percent": 0.0,
                                      "end_percent": 1.0},
             "ModelSamplingFlux": {"width": 64, "height": 64}, "CFGZeroStar": {}, "APG": {}, "RescaleCFG": {}},
}
WINDOW = {"start_percent": 0.0, "end_percent": 1.0}
OURS = {   # node -> (inputs, the setting's name, neutral, acting, the report counting its work or None)
    "TrainFreeDeepCache": (dict(WINDOW, cache_depth=1, schedule="uniform"), "cache_interval", 1, 3,
                           r"DeepCache: (\d+) of \d+ UNet calls used the shallow branch"),
    "TrainFreeDiTCache": ({"head_blocks": 1, "tail_blocks": 1}, "interval", 1, 3,
                          r"DiT block cache .*: \d+ full and (\d+) cached evaluations"),
    "TrainFreePAG": (dict(WINDOW, layers=""), "scale", 0.0, 2.0, None),
    "TrainFreeAdaptiveGuidance": ({}, "threshold", 1.0, 0.5, r"Adaptive Guidance skipped (\d+) of"),
    "TrainFreeNASA": (dict(WINDOW, negative=["neg", 0]), "alpha", 0.0, 0.3, None),
}
PACK = {"sd15": ["TrainFreeDeepCache", "TrainFreePAG", "TrainFreeAdaptiveGuidance", "TrainFreeNASA"],
        "flux": ["TrainFreeDiTCache", "TrainFreePAG", "TrainFreeAdaptiveGuidance", "TrainFreeNASA"]}
PAIRS = [(arch, core, ours) for arch in CORE for core in CORE[arch] for ours in PACK[arch]]


def _core_inputs(comfyui, node, overrides):
    inputs = {}
    for name, spec in comfyui.nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"].items():
        if name != "model":
            options = spec[1] if len(spec) > 1 else {}
            inputs[name] = spec[0][0] if isinstance(spec[0], list) else options.get("default")
    return dict(inputs, **overrides)


def _ours(node, acting):
    inputs, setting, neutral, act, _ = OURS[node]
    return node, dict(inputs, **{setting: act if acting else neutral})


def _run(comfyui, caplog, arch, chain):
    stats, log = run_logged(comfyui, patched_ksampler(chain, arch=arch, steps=6, cfg=4.0, seed=3, batch=2), caplog)
    return stats["sha256"][0], log


@pytest.mark.parametrize("arch,core,ours", PAIRS)
def test_pack_patch_beside_core_patch(comfyui, caplog, arch, core, ours):
    core_node = (core, _core_inputs(comfyui, core, CORE[arch][core]))
    core_alone = _run(comfyui, caplog, arch, [core_node])[0]
    ours_alone = _run(comfyui, caplog, arch, [_ours(ours, True)])[0]
    for order in ("core first", "pack first"):
        def pair(acting, order=order):
            return [core_node, _ours(ours, acting)] if order == "core first" else [_ours(ours, acting), core_node]

        assert _run(comfyui, caplog, arch, pair(False))[0] == core_alone, order
        both, log = _run(comfyui, caplog, arch, pair(True))
        assert both != core_alone, order
        if ours != "TrainFreeAdaptiveGuidance":
            assert both != ours_alone, f"{core} has no effect next to {ours} ({order})"
        report = OURS[ours][4]
        if report is not None:
            assert last_count(report, log) > 0, order
