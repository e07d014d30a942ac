"""Two guidance nodes and a cache in one graph, in either order, through the real executor.

Each node's own tests check it alone; here the pack's MODEL patches are stacked the way users wire
them (checkpoint -> patch -> patch -> patch -> KSampler) and every one of them must still act:
the caches report cached calls, Adaptive Guidance reports skipped evaluations, and PAG changes the
result. Batch 2 with cfg > 1 so cond and uncond rows, the perturbed pass and per-row decisions all
meet in one run.
"""

import pytest

from probes import last_count, run_logged
from prompts import patched_ksampler

CHAINS = {
    "sd15": [("TrainFreeAdaptiveGuidance", {"threshold": 0.9}),
             ("TrainFreePAG", {"scale": 2.0, "layers": "", "start_percent": 0.0, "end_percent": 1.0}),
             ("TrainFreeDeepCache", {"cache_interval": 3, "cache_depth": 1, "schedule": "uniform",
                                     "start_percent": 0.0, "end_percent": 1.0})],
    "flux": [("TrainFreeAdaptiveGuidance", {"threshold": 0.9}),
             ("TrainFreePAG", {"scale": 2.0, "layers": "", "start_percent": 0.0, "end_percent": 1.0}),
             ("TrainFreeDiTCache", {"interval": 3, "head_blocks": 1, "tail_blocks": 1})],
}
CHAINS["chroma"] = CHAINS["qwen_image"] = CHAINS["hunyuan_video"] = CHAINS["auraflow"] = CHAINS["flux"]
CHAINS["lumina2"] = CHAINS["flux"][:2] + [("TrainFreeDiTCache", {"interval": 3, "head_blocks": 1, "tail_blocks": 0})]
CHAINS["omnigen2"] = CHAINS["hidream"] = CHAINS["cosmos_predict2"] = CHAINS["pixart"] = CHAINS["lumina2"]   # 2 blocks
CHAINS["wan_vace"] = CHAINS["flux"][:2] + [("TrainFreeDiTCache", {"interval": 3, "head_blocks": 0, "tail_blocks": 0})]
CACHED = {"sd15": r"DeepCache: (\d+) of \d+ UNet calls used the shallow branch",   # the caches' own reports
          "flux": r"DiT block cache .*: \d+ full and (\d+) cached evaluations"}
for arch in ("chroma", "qwen_image", "hunyuan_video", "auraflow", "lumina2", "omnigen2", "hidream", "cosmos_predict2",
             "pixart", "wan_vace"):
    CACHED[arch] = CACHED["flux"]


def _prompt(arch, chain, steps=9, cfg=4.0):
    return patched_ksampler(chain, arch=arch, steps=steps, cfg=cfg, seed=3, batch=2)


def _run(comfyui, prompt, caplog):
    stats, log = run_logged(comfyui, prompt, caplog)
    return (stats["text"][0], stats["sum"][0]), log


@pytest.mark.parametrize("arch", ["sd15", "flux", "chroma", "qwen_image", "hunyuan_video", "auraflow", "lumina2",
                                  "hidream", "cosmos_predict2", "omnigen2", "pixart", "wan_vace"])
@pytest.mark.parametrize("order", ["guidance first", "cache first"])
def test_two_guidance_nodes_and_a_cache_all_act(comfyui, caplog, arch, order):
    chain = CHAINS[arch] if order == "guidance first" else CHAINS[arch][::-1]
    stats, log = _run(comfyui, _prompt(arch, chain), caplog)
    assert last_count(r"Adaptive Guidance skipped (\d+) of", log) > 0
    assert last_count(CACHED[arch], log) > 0
    # PAG acts: the same graph without PAG gives another result
    no_pag = [c for c in chain if c[0] != "TrainFreePAG"]
    assert _run(comfyui, _prompt(arch, no_pag), caplog)[0] != stats


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_stacked_graph_reruns_bit_identically(comfyui, caplog, arch):
    """A second queue of the same stacked graph (fresh cache state each run) gives the same latent."""
    first = _run(comfyui, _prompt(arch, CHAINS[arch], steps=7), caplog)[0]
    comfyui.executor.reset()   # forget cached node outputs: every node runs again, patches re-applied
    assert _run(comfyui, _prompt(arch, CHAINS[arch], steps=7), caplog)[0] == first


def test_lumina2_family_specific_nodes_refuse_with_a_reason(comfyui):
    """Lumina Image 2.0's NextDiT: the family-independent nodes, PAG, NASA and the DiT cache run on it (every such
    example workflow is run on it; the pack gives its main layers the block patches its forward lacks); DeepCache,
    which needs a U-Net, refuses by name."""
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    base = tiny.build("lumina2")
    nodes = comfyui.nodes.NODE_CLASS_MAPPINGS
    with pytest.raises(ValueError, match="DeepCache needs a U-Net"):
        nodes["TrainFreeDeepCache"]().patch(base, 3, 1, "uniform", 0.0, 1.0)
