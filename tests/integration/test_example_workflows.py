"""Every shipped example workflow, as the editor would queue it, on tiny SD1.5-style and flow DiT models."""
import json
from pathlib import Path

import pytest

import example_specs
from harness import ROOT
from test_nodes.tiny_models import PIXELS
from workflow_format import ui_to_api

EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
LOADERS = {"TrainFreeDPMSolverV3Load": "dpm_solver_v3_calibrate_and_sample.json",
           "TrainFreeDCSolverLoad": "dc_solver_search_and_sample.json", **example_specs.collect("LOADERS")}
FOR_TEST = example_specs.collect("FOR_TEST")
ARCHS = example_specs.collect("ARCHS")
# every example that runs on SD1.5 also runs on a v-prediction, zero-terminal-SNR SDXL (sigma_max about 4500) and
# on an EDM-preconditioned one (Playground v2.5: continuous sigmas 0.002 to 80)
SAMPLINGS = ["sdxl_vzsnr", "sdxl_edm"]
CASES = [(p, arch) for p in EXAMPLES for archs in [ARCHS.get(p.stem, ["sd15", "flux"])]
         for arch in archs + (SAMPLINGS if "sd15" in archs else [])]


def _for_test(api: dict, arch: str, dtype: str = "float32") -> dict:
    """Swap the checkpoint for a tiny random one (weights in ``dtype``) and shrink the image; probe every sampled
    latent."""
    for node_id, node in list(api.items()):
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = "TrainFreeTestTinyCheckpoint"
            node["inputs"] = {"arch": arch, "seed": 0, "dtype": dtype}
        elif node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=PIXELS.get(arch, 64), height=PIXELS.get(arch, 64))
        elif node["class_type"] == "TrainFreeDPMSolverV3Calibrate":
            node["inputs"].update(samples=8, grid_points=8, data_steps=5, overwrite=True)
        elif node["class_type"] == "TrainFreeScheduleSearch":
            node["inputs"].update(budget=6, reference_steps=12, overwrite=True)
        elif node["class_type"] == "TrainFreeDCSolverSearch":
            node["inputs"].update(steps="5,6", iterations=3, overwrite=True)
        elif node["class_type"] in FOR_TEST:
            node["inputs"].update(FOR_TEST[node["class_type"]])
        elif node["class_type"] in ("SamplerCustomAdvanced", "KSampler"):
            api[f"stats_{node_id}"] = {"class_type": "TrainFreeTestLatentStats", "inputs": {"samples": [node_id, 0]}}
    return api


def test_every_node_has_an_example(comfyui):
    used = set()
    for path in EXAMPLES:
        used |= {n["type"] for n in json.loads(path.read_text())["nodes"]}
    assert set(comfyui.pack().NODE_CLASS_MAPPINGS) <= used


# the examples that are not tied to one family (samplers, calibrations, guidance) also run on the other DiT families
# and on Stable Video Diffusion's video U-Net (EDM v-prediction, sigma_max 700)
OTHERS = [(p, a) for p in EXAMPLES if p.stem not in ARCHS
          for a in ("sd3", "chroma", "chroma_radiance", "qwen_image", "wan", "wan_i2v", "wan_vace", "wan22",
                    "hunyuan_video", "hunyuan_image", "ltxv", "lumina2", "auraflow", "hidream", "cosmos_predict2",
                    "omnigen2", "pixart", "pixart_sigma", "svd")]


@pytest.mark.parametrize("path,arch", OTHERS, ids=[f"{p.stem}-{a}" for p, a in OTHERS])
def test_family_independent_example_runs_on_other_families(comfyui, path: Path, arch):
    _run_example(comfyui, path, arch)


HALF = [(p, a) for p, a in CASES if a not in SAMPLINGS]
UNETS = ("sd15", "sdxl", *SAMPLINGS, "svd")


@pytest.mark.parametrize("path,arch", HALF, ids=[f"{p.stem}-{a}" for p, a in HALF])
def test_example_workflow_runs_in_half_precision(comfyui, path: Path, arch):
    """As on a GPU: the U-Nets' weights in float16, the DiTs' in bfloat16 (ComfyUI's defaults there), so every patch,
    cache and calibration meets half-precision activations next to its own float32 state."""
    _run_example(comfyui, path, arch, "float16" if arch in UNETS else "bfloat16")


FP8 = [(p, a) for p, a in CASES if a not in UNETS]


@pytest.mark.parametrize("path,arch", FP8, ids=[f"{p.stem}-{a}" for p, a in FP8])
def test_example_workflow_runs_with_fp8_weights(comfyui, path: Path, arch):
    """DiT weights stored in float8_e4m3fn and computed in bfloat16 (ComfyUI's manual cast), as most Flux / SD3 /
    Qwen-Image / Wan users load them."""
    _run_example(comfyui, path, arch, "float8_e4m3fn")


@pytest.mark.parametrize("path,arch", CASES, ids=[f"{p.stem}-{a}" for p, a in CASES])
def test_example_workflow_runs(comfyui, path: Path, arch):
    _run_example(comfyui, path, arch)


def _run_example(comfyui, path, arch, dtype="float32"):
    api = ui_to_api(json.loads(path.read_text()), comfyui.nodes.NODE_CLASS_MAPPINGS)
    for loader, maker in LOADERS.items():   # a Load example needs the file its calibration example writes
        if any(n["class_type"] == loader for n in api.values()):
            first = ui_to_api(json.loads((ROOT / "example_workflows" / maker).read_text()), comfyui.nodes.NODE_CLASS_MAPPINGS)
            assert comfyui.run(_for_test(first, arch, dtype))[0]
    ok, outputs, err = comfyui.run(_for_test(api, arch, dtype))
    assert ok, err
    stats = [v["text"][0] for k, v in outputs.items() if k.startswith("stats_")]
    assert stats and all("finite=True" in s for s in stats)
    images = [img for v in outputs.values() for img in v.get("images", [])]
    assert images and all((comfyui.tmp / "output" / i["subfolder"] / i["filename"]).is_file() for i in images)


def test_examples_are_served_as_templates(comfyui):
    """ComfyUI's template browser lists example_workflows/*.json of each custom-node folder."""
    import glob
    import os

    custom = comfyui.folder_paths.get_folder_paths("custom_nodes")[0]
    found = glob.glob(os.path.join(custom, "*", "example_workflows", "*.json"))
    assert {Path(f).name for f in found} >= {p.name for p in EXAMPLES}


def test_a_calibration_workflow_saved_before_its_optional_inputs_existed_still_runs(comfyui):
    """CacheQuant Calibrate gained start_at_step / end_at_step / add_noise (optional, appended last): a workflow
    saved before has no values for them; the editor gives them their defaults, which calibrate the whole run."""
    ui = json.loads((ROOT / "example_workflows" / "cache_quant_calibrate_and_sample.json").read_text())
    node = next(n for n in ui["nodes"] if n["type"] == "TrainFreeCacheQuantCalibrate")
    node["widgets_values"] = node["widgets_values"][:-3]
    api = ui_to_api(ui, comfyui.nodes.NODE_CLASS_MAPPINGS)
    inputs = api[str(node["id"])]["inputs"]
    assert (inputs["start_at_step"], inputs["end_at_step"], inputs["add_noise"]) == (0, 10000, True)
    ok, outputs, err = comfyui.run(_for_test(api, "flux"))
    assert ok, err
