"""The pack's MODEL patches with two core features users wire them beside.

- Regional prompts (ConditioningSetArea, ConditioningSetMask): ComfyUI then calls the model on crops
  of the latent and on several positive conds per step, so one step holds calls of other shapes.
  Neutral settings must give the unpatched latent bit for bit, acting ones must act (and the caches
  must still skip work).
- TorchCompileModel: core swaps the diffusion model for a compiled one inside apply_model, before
  or after the pack's patches. The result must match the uncompiled graph's to compiler rounding
  (a patch dropped under compilation moves it 100x more) and the caches must still skip work. NASA, PAG
  and the DiT cache together on Flux gave another result under compilation until the DiT cache kept its
  bookkeeping out of the compiler's traces. On HiDream, NASA's wrapper and attention override and PAG's call
  numbering act under compilation too, with the DiT cache on the block patches the pack gives HiDream; the same
  on PixArt, whose attention calls get the forward's options from the pack.
"""
import re
import shutil

import pytest

from probes import last_count, run_logged
from prompts import patched_ksampler

NASA = ("TrainFreeNASA", {"negative": ["neg", 0], "start_percent": 0.0, "end_percent": 1.0})
PATCHES = {   # node -> (its inputs, the neutral setting, an acting setting)
    "TrainFreeDeepCache": ({"cache_depth": 1, "schedule": "uniform", "start_percent": 0.0, "end_percent": 1.0},
                           ("cache_interval", 1), ("cache_interval", 3)),
    "TrainFreeDiTCache": ({"head_blocks": 1, "tail_blocks": 1}, ("interval", 1), ("interval", 3)),
    "TrainFreePAG": ({"layers": "", "start_percent": 0.0, "end_percent": 1.0}, ("scale", 0.0), ("scale", 2.0)),
    "TrainFreeAdaptiveGuidance": ({}, ("threshold", 1.0), ("threshold", 0.5)),
    "TrainFreeNASA": (NASA[1], ("alpha", 0.0), ("alpha", 0.3)),
}
# the tiny models with 2 blocks in all cache the first: Lumina 2's and OmniGen2's main layers, HiDream's double- and
# single-stream block, Cosmos-Predict2's blocks
TWO_BLOCKS = {(a, "TrainFreeDiTCache"): {"head_blocks": 0} for a in ("lumina2", "omnigen2", "hidream",
                                                                     "cosmos_predict2", "pixart")}
CACHED = {"TrainFreeDeepCache": r"DeepCache: (\d+) of \d+ UNet calls used the shallow branch",
          "TrainFreeDiTCache": r"DiT block cache .*: \d+ full and (\d+) cached evaluations",
          "TrainFreeAdaptiveGuidance": r"Adaptive Guidance skipped (\d+) of"}


def _patch(node, setting, arch=None):
    inputs, _, _ = PATCHES[node]
    return node, dict(inputs, **TWO_BLOCKS.get((arch, node), {}), **dict([setting]))


def _regional(prompt, kind):
    """The positive prompt plus a second one on the left half (area) or under a mask's bounds."""
    size = prompt["latent"]["inputs"]["width"]
    prompt["pos2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red boat"}}
    if kind == "area":
        prompt["reg"] = {"class_type": "ConditioningSetArea", "inputs": {
            "conditioning": ["pos2", 0], "width": size // 2, "height": size, "x": 0, "y": 0, "strength": 1.0}}
    else:
        prompt["mask"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": size // 2, "height": size}}
        prompt["reg"] = {"class_type": "ConditioningSetMask", "inputs": {
            "conditioning": ["pos2", 0], "mask": ["mask", 0], "strength": 1.0, "set_cond_area": "mask bounds"}}
    prompt["both"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["pos", 0],
                                                                       "conditioning_2": ["reg", 0]}}
    prompt["ks"]["inputs"]["positive"] = ["both", 0]
    return prompt


def _skipped(node, log):
    return last_count(CACHED[node], log)


CACHES = [("sd15", "TrainFreeDeepCache"), ("sdxl", "TrainFreeDeepCache"), ("flux", "TrainFreeDiTCache"),
          ("hidream", "TrainFreeDiTCache"), ("cosmos_predict2", "TrainFreeDiTCache"), ("pixart", "TrainFreeDiTCache")]
GUIDANCE = [("sd15", "TrainFreePAG"), ("flux", "TrainFreePAG"), ("sd15", "TrainFreeAdaptiveGuidance"),
            ("sd15", "TrainFreeNASA"), ("flux", "TrainFreeNASA"), ("hidream", "TrainFreeNASA"),
            ("hidream", "TrainFreePAG"), ("lumina2", "TrainFreeNASA"), ("omnigen2", "TrainFreeNASA"),
            ("pixart", "TrainFreeNASA"), ("pixart", "TrainFreePAG")]
# PixArt's network takes no latent below 33 x 33 (tiny_models.SMALLEST), a crop of one neither: its regions are the
# left half of a 64 x 64 latent (32 x 64)
SIZE = {"pixart": 512}
# a mask's bounds crop as an area does; the caches, which keep an entry per kind of call, get both (not on
# Cosmos-Predict2's 5-D latent, whose mask bounds ComfyUI 0.3.64's own get_mask_aabb cannot take)
REGIONAL = [("area", a, n) for a, n in CACHES + GUIDANCE] + [("mask", a, n) for a, n in CACHES
                                                             if a != "cosmos_predict2"]


@pytest.mark.parametrize("kind,arch,node", REGIONAL)
def test_patches_with_regional_prompts(comfyui, caplog, kind, arch, node):
    def graph(chain):
        return _regional(patched_ksampler(chain, arch=arch, steps=6, cfg=4.0, seed=3, batch=2,
                                          size=SIZE.get(arch, 128)), kind)

    plain = run_logged(comfyui, graph([]), caplog)[0]
    _, neutral, acting = PATCHES[node]
    assert run_logged(comfyui, graph([_patch(node, neutral, arch)]), caplog)[0]["sha256"] == plain["sha256"]
    acted, log = run_logged(comfyui, graph([_patch(node, acting, arch)]), caplog)
    assert acted["sha256"] != plain["sha256"]
    if node in CACHED:
        assert _skipped(node, log) > 0


def _compiler_missing():
    return shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("cl") is None


CHAINS = {"sd15": ["TrainFreeAdaptiveGuidance", "TrainFreePAG", "TrainFreeDeepCache"],
          "flux": ["TrainFreeNASA", "TrainFreePAG", "TrainFreeDiTCache"],
          "hidream": ["TrainFreeNASA", "TrainFreePAG", "TrainFreeDiTCache"],   # a wrapper and call numbering; the
          # pack's block patches for the cache
          "lumina2": ["TrainFreeNASA", "TrainFreePAG", "TrainFreeDiTCache"],   # the same, a rotary embedder and the
          # layers swapped per forward
          "omnigen2": ["TrainFreeNASA", "TrainFreePAG", "TrainFreeDiTCache"],   # the same, from APPLY_MODEL wrappers
          "pixart": ["TrainFreeNASA", "TrainFreePAG", "TrainFreeDiTCache"]}    # the same; its attention calls given
# the forward's options (nodes/pixart_options.py) under compilation too


@pytest.mark.skipif(_compiler_missing(), reason="torch.compile's inductor backend needs a C compiler on the CPU")
@pytest.mark.parametrize("arch,where", [("sd15", "before"), ("sd15", "after"), ("flux", "after"), ("hidream", "after"),
                                        ("lumina2", "after"), ("omnigen2", "after"), ("omnigen2", "before"),
                                        ("pixart", "after"), ("pixart", "before")])
def test_patches_under_torch_compile(comfyui, caplog, arch, where):
    import torch._dynamo

    chain = [_patch(node, PATCHES[node][2], arch) for node in CHAINS[arch]]
    compile_node = ("TorchCompileModel", {"backend": "inductor"})
    eager, _ = run_logged(comfyui, patched_ksampler(chain, arch=arch, steps=6, cfg=4.0, seed=3), caplog)
    plain, _ = run_logged(comfyui, patched_ksampler([], arch=arch, steps=6, cfg=4.0, seed=3), caplog)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_chain = [compile_node] + chain if where == "before" else chain + [compile_node]
    try:
        prompt = patched_ksampler(compiled_chain, arch=arch, steps=6, cfg=4.0, seed=3)
        compiled, log = run_logged(comfyui, prompt, caplog)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
        comfyui.executor.reset()              # drop the cached compiled model with the graph's outputs
    assert graphs > 0                                     # the diffusion model did run compiled
    effect = abs(eager["sum"][0] - plain["sum"][0])
    assert effect > 1e-3 * abs(plain["sum"][0])
    assert abs(compiled["sum"][0] - eager["sum"][0]) < 0.01 * effect
    for node in CHAINS[arch]:
        if node in CACHED:
            assert _skipped(node, log) > 0, node
    if "TrainFreeDiTCache" in CHAINS[arch] or "TrainFreeDeepCache" in CHAINS[arch]:   # the caches' reports name it
        reports = [line for line in log if re.search(r"DeepCache:|DiT block cache", line)]
        assert reports and all("TorchCompileModel: runs that compile" in line for line in reports), reports
