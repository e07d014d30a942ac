"""Schedule search in ComfyUI: a tiny model, a core sampler, cached SIGMAS usable by any sampler."""
import time

import pytest
import torch


def _search(comfyui, model, sampler, overwrite=True, **kw):
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    args = dict(model=model, positive=tiny.conditioning("sd15", 1), negative=tiny.conditioning("sd15", 2),
                latent_image={"samples": torch.zeros(4, 4, 8, 8)}, sampler=sampler, steps=5, cfg=4.0,
                initial_scheduler="karras", budget=12, reference_steps=20, seed=0, name="sched", overwrite=overwrite)
    args.update(kw)
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeScheduleSearch"]().search(**args)[0]


def test_search_cache_and_refusals(comfyui, models_dir):
    import comfy.samplers

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    model = tiny.build("sd15")
    euler = comfy.samplers.sampler_object("euler")
    t = time.time()
    sigmas = _search(comfyui, model, euler)
    assert time.time() - t < 60
    assert sigmas.shape == (6,) and sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    assert torch.equal(_search(comfyui, model, euler, overwrite=False), sigmas)       # cached
    with pytest.raises(ValueError, match="another name, or set overwrite"):
        _search(comfyui, model, comfy.samplers.sampler_object("dpmpp_2m"), overwrite=False)  # other sampler
    with pytest.raises(ValueError, match="another name, or set overwrite"):
        _search(comfyui, tiny.build("sd15", seed=2), euler, overwrite=False)                # other model
