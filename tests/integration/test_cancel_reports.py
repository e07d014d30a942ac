"""A run cancelled half-way says so in the per-run summary of the DiT Block Cache, Adaptive Guidance and LinearAG
(as DeepCache's does): its counts cover part of the run only. A finished run's summary stays as it was."""
import logging

import pytest
import torch

import test_cache_quant_nodes as cq
import test_linear_ag_nodes as lag


def _run(comfyui, model, arch, cancel_at=None, steps=8):
    import comfy.model_management
    import comfy.sample

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(2, 4, 8, 8))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))

    def stop(step, *a):
        if step == cancel_at:
            raise comfy.model_management.InterruptProcessingException()

    return comfy.sample.sample(model, noise, steps, 4.0, "euler", "normal" if arch == "sd15" else "simple",
                               tiny.conditioning(arch, 3, 2), tiny.conditioning(arch, 4, 2), latent, seed=4,
                               callback=stop, disable_pbar=True)


def _summary(caplog, what):
    (line,) = [r.getMessage() for r in caplog.records if what in r.getMessage()]
    return line


@pytest.mark.parametrize("node", ["TrainFreeDiTCache", "TrainFreeAdaptiveGuidance", "TrainFreeLinearAG"])
def test_a_cancelled_runs_summary_says_so(comfyui, models_dir, caplog, node):
    import comfy.model_management

    nodes = comfyui.nodes.NODE_CLASS_MAPPINGS
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    if node == "TrainFreeDiTCache":
        arch, what = "flux", "DiT block cache ("
        model = cq._cache(comfyui, tiny.build(arch), arch)
    elif node == "TrainFreeAdaptiveGuidance":
        arch, what = "sd15", "Adaptive Guidance skipped"
        model = nodes[node]().patch(tiny.build(arch), 0.5)[0]
    else:
        arch, what = "sd15", "LinearAG replaced"
        base = tiny.build(arch)
        model = lag._patch(comfyui, base, lag._calibrate(comfyui, base))
    caplog.set_level(logging.INFO, logger="trainfree")
    _run(comfyui, model, arch)
    assert "interrupted" not in _summary(caplog, what)                 # a full run: as before
    caplog.clear()
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _run(comfyui, model, arch, cancel_at=4)
    assert _summary(caplog, what).endswith("[run interrupted; cache freed]" if node == "TrainFreeDiTCache"
                                           else "[run interrupted]")
