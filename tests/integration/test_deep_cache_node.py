"""DeepCache as a MODEL patch in real ComfyUI on tiny random U-Nets: exactness, skipping, state, composition."""
import logging

import pytest
import torch


def _tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def _dc(comfyui, model, interval=3, depth=1, schedule="uniform", start=0.0, end=1.0, node_id=None):
    node = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDeepCache"]()
    return node.patch(model, interval, depth, schedule, start, end, unique_id=node_id)[0]


def _sample(comfyui, model, arch="sd15", steps=6, batch=1, cfg=4.0, sampler="euler", size=8, seed=4, pos=None,
            neg=None, callback=None):
    import comfy.sample

    tiny = _tiny(comfyui)
    latent = torch.zeros(batch, 4, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    pos = tiny.conditioning(arch, 1, batch) if pos is None else pos
    neg = tiny.conditioning(arch, 2, batch) if neg is None else neg
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", pos, neg, latent, seed=seed,
                               disable_pbar=True, callback=callback)


def _controller(model):
    import comfy.patcher_extension as pe

    return model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, "trainfree_deep_cache")[0].__self__


def test_interval_one_and_empty_window_are_bit_identical(comfyui):
    base = _tiny(comfyui).build("sd15")
    plain = _sample(comfyui, base)
    assert torch.equal(_sample(comfyui, _dc(comfyui, base, interval=1)), plain)
    assert torch.equal(_sample(comfyui, _dc(comfyui, base, interval=3, start=0.5, end=0.5)), plain)
    assert torch.equal(_sample(comfyui, base), plain)                 # object patches removed again


def _reference(comfyui, base, full_steps, depth=1, **kw):
    """DeepCache by forward hooks on the unpatched model: at cached steps the output of the output block
    just before the fresh ones is replaced by its value at the last full step (one call per step)."""
    dm = base.model.diffusion_model
    boundary = len(dm.input_blocks) - 2 - depth
    last = dm.output_blocks[boundary][-1] if boundary >= 0 else dm.middle_block[-1]
    state = {"call": 0, "H": None}

    def hook(module, inputs, output):
        step = state["call"]
        if step in full_steps:
            state["H"] = output.clone()
            return None
        return state["H"].clone()

    def count(module, inputs, output):
        state["call"] += 1

    handles = [last.register_forward_hook(hook), dm.out.register_forward_hook(count)]
    try:
        return _sample(comfyui, base, **kw)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch,batch", [("sd15", 2), ("svd", 3)])
def test_cached_steps_skip_the_deep_blocks_and_match_a_hook_reference(comfyui, caplog, arch, batch):
    """SD1.5 with a batch of 2; Stable Video Diffusion's video U-Net (temporal res blocks and attention, EDM
    v-prediction) with 3 frames, its batch: both rows of CFG in one call, so 2 x batch rows per call."""
    base = _tiny(comfyui).build(arch)
    dm = base.model.diffusion_model
    deep, shallow = [], []
    hooks = [dm.middle_block[0].register_forward_hook(lambda m, i, o: deep.append(o.shape[0])),
             dm.input_blocks[3][0].register_forward_hook(lambda m, i, o: deep.append(o.shape[0])),
             dm.input_blocks[1][0].register_forward_hook(lambda m, i, o: shallow.append(o.shape[0]))]
    try:
        with caplog.at_level(logging.INFO, logger="trainfree"):
            out = _sample(comfyui, _dc(comfyui, base, interval=3), arch, steps=6, batch=batch)
    finally:
        for h in hooks:
            h.remove()
    rows = 2 * batch
    assert deep == [rows] * 4 and shallow == [rows] * 6     # 2 full steps x (middle + deep input); 6 shallow
    assert "4 of 6 UNet calls used the shallow branch" in caplog.text and "2 of 6 steps full" in caplog.text
    ref = _reference(comfyui, base, {0, 3}, arch=arch, steps=6, batch=batch)
    assert torch.equal(out, ref)
    plain = _sample(comfyui, base, arch, steps=6, batch=batch)
    assert (out - plain).abs().max() > 1e-3 * plain.abs().max()     # the cache really changed something
    assert torch.equal(_sample(comfyui, _dc(comfyui, base, interval=1), arch, steps=6, batch=batch), plain)


def test_cond_and_uncond_in_one_chunk_or_separately_and_batch_rows(comfyui, monkeypatch):
    """Separate cond/uncond calls (forced through the memory estimate) keep separate caches: same result
    as the batched chunk. A batch of 2 prompts gives what each prompt gives alone."""
    base = _tiny(comfyui).build("sd15")
    together = _sample(comfyui, _dc(comfyui, base), batch=2)
    calls = []
    model = _dc(comfyui, base)
    ctl = _controller(model)
    monkeypatch.setattr(base.model, "memory_required", lambda *a, **k: 1e30)   # one cond per model call
    apart = _sample(comfyui, model, batch=2)
    calls.append(ctl.last_report)
    monkeypatch.undo()
    assert "8 of 12 UNet calls used the shallow branch" in calls[0]          # 2 calls per step
    tol = 1e-5 * together.abs().max().item()           # batched vs separate convolutions: ~1.5e-6 relative
    torch.testing.assert_close(apart, together, rtol=0, atol=tol)
    plain = _sample(comfyui, base, batch=2)
    assert (together - plain).abs().max() > 100 * tol    # crossed caches would show at this scale
    tiny = _tiny(comfyui)
    pos, neg = tiny.conditioning("sd15", 1, 2), tiny.conditioning("sd15", 2, 2)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    for i in range(2):
        import comfy.sample

        alone = comfy.sample.sample(_dc(comfyui, base), noise[i:i + 1], 6, 4.0, "euler", "normal",
                                    [[pos[0][0][i:i + 1], {}]], [[neg[0][0][i:i + 1], {}]],
                                    torch.zeros(1, 4, 8, 8), seed=4, disable_pbar=True)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=tol)


def test_no_stale_state_across_runs_resolutions_batches_and_models(comfyui):
    tiny = _tiny(comfyui)
    base = tiny.build("sd15")
    model = _dc(comfyui, base, interval=2)
    first = _sample(comfyui, model, size=8, batch=1)
    second = _sample(comfyui, model, size=16, batch=2, steps=5)
    assert torch.equal(second, _sample(comfyui, _dc(comfyui, base, interval=2), size=16, batch=2, steps=5))
    assert torch.equal(_sample(comfyui, model, size=8, batch=1), first)
    other = tiny.build("sd15", seed=1)                                       # another model, same node settings
    assert torch.equal(_sample(comfyui, _dc(comfyui, other, interval=2)),
                       _sample(comfyui, _dc(comfyui, other, interval=2)))
    assert torch.equal(_sample(comfyui, base), _sample(comfyui, tiny.build("sd15")))   # base left unpatched


def test_interrupted_run_leaves_no_cache(comfyui):
    import comfy.patcher_extension as pe

    base = _tiny(comfyui).build("sd15")
    model = _dc(comfyui, base).clone()
    seen = []

    def spy(executor, *args, **kwargs):
        seen.append(args[-1].get("trainfree_deep_cache"))
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_spy", spy)

    class Stop(Exception):
        pass

    def stop(step, *args):
        if step == 2:
            raise Stop()

    with pytest.raises(Stop):
        _sample(comfyui, model, callback=stop)
    ctl = _controller(model)
    assert seen and seen[0] is not None and all(r is seen[0] for r in seen)
    assert seen[0].entries == {} and ctl.plan is None and "interrupted" in ctl.last_report
    assert "trainfree_deep_cache" not in model.model_options["transformer_options"]
    assert torch.equal(_sample(comfyui, model), _sample(comfyui, _dc(comfyui, base)))


def test_composes_with_adaptive_guidance_pag_and_lora(comfyui, caplog):
    import comfy_extras.nodes_pag as pag

    base = _tiny(comfyui).build("sd15")
    ag = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeAdaptiveGuidance"]()

    def stack(model, dc_first, interval):
        if dc_first:
            model = _dc(comfyui, model, interval=interval)
        model = pag.PerturbedAttentionGuidance.execute(ag.patch(model, 0.9999)[0], 2.0)[0]
        return model if dc_first else _dc(comfyui, model, interval=interval)

    reference = _sample(comfyui, stack(base, False, 1), steps=6, batch=2)
    assert torch.equal(_sample(comfyui, stack(base, True, 1), steps=6, batch=2), reference)
    with caplog.at_level(logging.INFO, logger="trainfree"):
        cached = _sample(comfyui, stack(base, True, 3), steps=6, batch=2)
    assert torch.isfinite(cached).all() and (cached - reference).abs().max() > 1e-4
    assert "8 of 12 UNet calls used the shallow branch" in caplog.text     # CFG chunk and PAG pass, own caches
    assert torch.equal(_sample(comfyui, stack(base, False, 3), steps=6, batch=2), cached)

    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"             # a LoRA-like weight patch
    deep_key = "diffusion_model.middle_block.0.in_layers.2.weight"
    weights = base.model.state_dict()

    def lora(model):
        m = model.clone()
        m.add_patches({key: (0.05 * torch.randn_like(weights[key]),),
                       deep_key: (0.05 * torch.randn_like(weights[deep_key]),)}, 1.0)
        return m

    torch.manual_seed(0)
    lora_then_dc = _sample(comfyui, _dc(comfyui, lora(base)))
    torch.manual_seed(0)
    dc_then_lora = _sample(comfyui, lora(_dc(comfyui, base)))
    torch.manual_seed(0)
    plain_lora = _sample(comfyui, lora(base))
    torch.manual_seed(0)
    assert torch.equal(_sample(comfyui, _dc(comfyui, lora(base), interval=1)), plain_lora)
    assert torch.equal(lora_then_dc, dc_then_lora)
    assert (lora_then_dc - _sample(comfyui, _dc(comfyui, base))).abs().max() > 1e-4
    assert torch.equal(_sample(comfyui, base), _sample(comfyui, _tiny(comfyui).build("sd15")))   # weights restored


def _tiny_controlnet(comfyui):
    """A random ControlNet with the tiny SD1.5 U-Net's layout (core comfy.cldm ControlNet + comfy.controlnet)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    tiny = _tiny(comfyui)
    cfg = dict(tiny._config("sd15").unet_config)
    cfg.pop("out_channels")
    net = comfy.cldm.cldm.ControlNet(**cfg, hint_channels=3, operations=comfy.ops.disable_weight_init,
                                     dtype=torch.float32, device=torch.device("cpu"))
    tiny._reinit(net, 7)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"))


def test_controlnet_residuals_reach_the_fresh_blocks(comfyui):
    import nodes

    tiny = _tiny(comfyui)
    base = tiny.build("sd15")
    hint = torch.rand((1, 64, 64, 3), generator=torch.Generator().manual_seed(3))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(
        tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2), _tiny_controlnet(comfyui), hint, 1.0, 0.0, 1.0)
    with_cn = _sample(comfyui, base, pos=pos, neg=neg)
    assert torch.equal(_sample(comfyui, _dc(comfyui, base, interval=1), pos=pos, neg=neg), with_cn)
    cached = _sample(comfyui, _dc(comfyui, base, interval=3), pos=pos, neg=neg)
    assert torch.equal(cached, _reference(comfyui, base, {0, 3}, pos=pos, neg=neg))
    assert (cached - _sample(comfyui, _dc(comfyui, base, interval=3))).abs().max() > 1e-3


def test_sdxl_and_deepest_branch(comfyui):
    tiny = _tiny(comfyui)
    base = tiny.build("sdxl")
    plain = _sample(comfyui, base, arch="sdxl")
    assert torch.equal(_sample(comfyui, _dc(comfyui, base, interval=1), arch="sdxl"), plain)
    for depth in (0, 1, 3):                     # 3 = every input block fresh: only the middle block is cached
        out = _sample(comfyui, _dc(comfyui, base, interval=3, depth=depth), arch="sdxl")
        assert torch.equal(out, _reference(comfyui, base, {0, 3}, depth=depth, arch="sdxl"))
        assert (out - plain).abs().max() > 1e-5


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_refuses_models_without_a_unet(comfyui, arch):
    with pytest.raises(ValueError, match="needs a U-Net.*(SD3|Flux)"):
        _dc(comfyui, _tiny(comfyui).build(arch))


def test_refusals_and_other_caches(comfyui):
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    base = _tiny(comfyui).build("sd15")
    with pytest.raises(ValueError, match="cache_depth 4 does not fit.*0..3"):
        _dc(comfyui, base, depth=4)
    with pytest.raises(ValueError, match=r"start_percent \(0.8\) is after end_percent \(0.2\)"):
        _dc(comfyui, base, start=0.8, end=0.2)
    with pytest.raises(ValueError, match="already applied"):
        _dc(comfyui, _dc(comfyui, base))
    with pytest.raises(ValueError, match="EasyCache"):
        _dc(comfyui, EasyCacheNode.execute(base, 0.2, 0.15, 0.95, False)[0])
    with pytest.raises(RuntimeError, match="LazyCache|lazycache"):
        _sample(comfyui, LazyCacheNode.execute(_dc(comfyui, base), 0.2, 0.15, 0.95, False)[0])
    cq = _dc(comfyui, base).clone()
    cq.add_wrapper_with_key("diffusion_model", "trainfree_cache_quant_x", lambda ex, *a, **k: ex(*a, **k))
    with pytest.raises(RuntimeError, match="trainfree_cache_quant"):
        _sample(comfyui, cq)
    dit = base.clone()
    dit.model_options["transformer_options"]["trainfree_dit_cache"] = object()     # the pack's DiT cache holder
    with pytest.raises(ValueError, match="trainfree_dit_cache"):
        _dc(comfyui, dit)


def test_report_goes_to_the_log_and_the_node(comfyui, monkeypatch, caplog):
    import server

    sent = []

    class Stub:
        def send_progress_text(self, text, node_id, sid=None):
            sent.append((node_id, text))

    monkeypatch.setattr(server.PromptServer, "instance", Stub(), raising=False)
    with caplog.at_level(logging.INFO, logger="trainfree"):
        _sample(comfyui, _dc(comfyui, _tiny(comfyui).build("sd15"), interval=3, node_id="17"), steps=9)
    assert len(sent) == 1 and sent[0][0] == "17"
    text = sent[0][1]
    assert "6 of 9 UNet calls used the shallow branch" in text and "3 of 9 steps full" in text
    assert "speed-up" in text and "MiB" in text and text in caplog.text


def test_graph_with_pag_and_adaptive_guidance_nodes(comfyui):
    """Through the executor: checkpoint -> DeepCache -> Adaptive Guidance -> PAG -> KSampler."""
    prompt = {
        "ckpt": {"class_type": "TrainFreeTestTinyCheckpoint", "inputs": {"arch": "sd15", "seed": 0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "b"}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "dc": {"class_type": "TrainFreeDeepCache", "inputs": {
            "model": ["ckpt", 0], "cache_interval": 3, "cache_depth": 1, "schedule": "quadratic",
            "start_percent": 0.0, "end_percent": 1.0}},
        "ag": {"class_type": "TrainFreeAdaptiveGuidance", "inputs": {"model": ["dc", 0], "threshold": 0.9999}},
        "pag": {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["ag", 0], "scale": 2.0}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["pag", 0], "seed": 1, "steps": 6, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0], "denoise": 1.0}},
        "stats": {"class_type": "TrainFreeTestLatentStats", "inputs": {"samples": ["ks", 0]}},
    }
    ok, out, err = comfyui.run(prompt)
    assert ok, err
    assert "finite=True" in out["stats"]["text"][0]


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral", "uni_pc"])
def test_multistage_and_multistep_samplers(comfyui, sampler):
    """Intermediate evaluations belong to the step they start from; each gets its own cache entry."""
    base = _tiny(comfyui).build("sd15")
    plain = _sample(comfyui, base, sampler=sampler)
    assert torch.equal(_sample(comfyui, _dc(comfyui, base, interval=1), sampler=sampler), plain)
    model = _dc(comfyui, base, interval=3)
    out = _sample(comfyui, model, sampler=sampler)
    stats = _controller(model).last_stats
    assert torch.isfinite(out).all() and stats["cached"] > stats["full"] > 0
    assert (out - plain).abs().max() > 1e-4


@pytest.mark.parametrize("sampler", ["trainfree_ts_ddim", "trainfree_ts_dpmpp_2m"])
def test_time_shift_samplers_keep_the_cache_schedule(comfyui, caplog, sampler):
    """The time-shift samplers call the UNet at a shifted sigma; the cache must still count the schedule's
    steps (it once took step 1's shifted call for step 0: 5 of 9 shallow, the schedule one step late)."""
    base = _tiny(comfyui).build("sd15")
    with caplog.at_level(logging.INFO, logger="trainfree"):
        _sample(comfyui, _dc(comfyui, base, interval=3), steps=9, sampler=sampler)
    assert "6 of 9 UNet calls used the shallow branch" in caplog.text and "3 of 9 steps full" in caplog.text
