"""DiT block cache (CacheQuant schedule) in real ComfyUI on tiny Flux, SD3, Wan, Chroma, Qwen-Image, HunyuanVideo,
LTX-Video, AuraFlow, Lumina 2, OmniGen2, HiDream, Cosmos-Predict2 and PixArt models (the block patches the last five's
forwards lack come from nodes/block_patches.py; PixArt's smallest latent is 40 x 40)."""
import logging

import pytest
import torch

from probes import count_rows
from prompts import patched_ksampler

SPANS = {"flux": (1, 1), "sd3": (1, 0), "wan": (1, 0), "chroma": (1, 1), "qwen_image": (1, 1),   # SD3 / Wan: 2 blocks
         "hunyuan_video": (1, 1), "chroma_radiance": (1, 1), "ltxv": (1, 1), "hunyuan_image": (1, 1),
         "wan_i2v": (1, 0), "auraflow": (1, 0),                   # AuraFlow: 1 double, 2 single blocks
         "wan_vace": (0, 0),                      # Wan VACE: its control block's hint added inside the span
         "lumina2": (1, 0), "omnigen2": (1, 0),                    # Lumina 2, OmniGen2: 2 main layers
         "hidream": (0, 0),           # HiDream: 1 double, 1 single block; the span crosses into the joined stream
         "cosmos_predict2": (1, 0), "pixart": (1, 0)}              # Cosmos-Predict2, PixArt: 2 blocks
NO_PATCHES = ("lumina2", "omnigen2", "hidream", "cosmos_predict2", "pixart")   # no block patches in their forwards
ARCHS = list(SPANS)


def _tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def _node(comfyui, name):
    return comfyui.nodes.NODE_CLASS_MAPPINGS[name]()


def _sample(comfyui, model, arch, steps=8, cfg=3.0, batch=1, size=8, seed=4, prompts=(1, 2)):
    import comfy.sample

    tiny = _tiny(comfyui)
    size = tiny.side(arch, size)
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(batch, 4, size, size))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    pos = tiny.conditioning(arch, prompts[0], batch)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, tiny.conditioning(arch, prompts[1], batch),
                               latent, seed=seed, disable_pbar=True)


def _cache(comfyui, model, arch, interval=3, schedule=None):
    head, tail = SPANS[arch]
    return _node(comfyui, "TrainFreeDiTCache").patch(model, interval, head, tail, schedule=schedule)[0]


def _calibrate(comfyui, model, arch, steps=8, correction=True, name="cq", cfg=3.0, seed=0, interval=3, size=8,
               batch=1):
    tiny = _tiny(comfyui)
    head, tail = SPANS[arch]
    size = tiny.side(arch, size)
    return _node(comfyui, "TrainFreeCacheQuantCalibrate").calibrate(
        model, tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), {"samples": torch.zeros(batch, 4, size, size)},
        seed,
        steps, cfg, "euler", "simple", interval, head, tail, correction, name, True)[0]


def _counting(comfyui, model, arch):
    """A block replacement on every block that counts the calls reaching the real block (ours chains to it)."""
    calls = []
    dm = model.get_model_object("diffusion_model")
    if arch in ("flux", "chroma", "hunyuan_video", "chroma_radiance", "hunyuan_image", "auraflow", "hidream"):
        doubles, singles = (dm.double_layers, dm.single_layers) if arch == "auraflow" else \
            (dm.double_stream_blocks, dm.single_stream_blocks) if arch == "hidream" else \
            (dm.double_blocks, dm.single_blocks)
        keys = [("double_block", i) for i in range(len(doubles))] + [("single_block", i) for i in range(len(singles))]
    else:
        blocks = {"sd3": "joint_blocks", "wan": "blocks", "wan_i2v": "blocks", "wan_vace": "blocks",
                  "qwen_image": "transformer_blocks", "ltxv": "transformer_blocks", "lumina2": "layers",
                  "omnigen2": "layers", "cosmos_predict2": "blocks", "pixart": "blocks"}[arch]
        keys = [("double_block", i) for i in range(len(getattr(dm, blocks)))]
    m = model.clone()
    if arch in NO_PATCHES:    # no block patches in their forwards: the pack's stand-in hands them over
        comfyui.module_of("TrainFreeDiTCache").block_patches.install(m, dm)
    for k in keys:
        m.set_model_patch_replace(lambda args, extra, k=k: (calls.append(k), extra["original_block"](args))[1],
                                  "dit", k[0], k[1])
    return m, calls


@pytest.mark.parametrize("arch", ARCHS)
def test_interval_one_is_bit_identical_and_cached_steps_skip_the_span(comfyui, arch, caplog):
    base = _tiny(comfyui).build(arch)
    ref = _sample(comfyui, base, arch)
    assert torch.equal(_sample(comfyui, _cache(comfyui, base, arch, interval=1), arch), ref)
    counted, calls = _counting(comfyui, base, arch)
    assert torch.equal(_sample(comfyui, counted, arch), ref)           # the counter itself changes nothing
    n_blocks = len(calls) // 8
    calls.clear()
    with caplog.at_level(logging.INFO, logger="trainfree"):
        out = _sample(comfyui, _cache(comfyui, counted, arch, interval=3), arch)
    span = n_blocks - sum(SPANS[arch])
    assert len(calls) == 8 * n_blocks - 5 * span                      # steps 0, 3, 6 full; 5 cached (cond+uncond batched)
    assert f"5 cached evaluations; span blocks run {3 * span}, skipped {5 * span}" in caplog.text
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_error_correction_reduces_the_deviation_of_plain_reuse(comfyui, models_dir, arch, cfg):
    """Same DPS schedule with and without DEC, sampled from another seed than the calibration's. The per-channel
    fit needs many tokens: calibration on 2 samples of 12 x 12 patches (a tiny latent overfits it)."""
    base = _tiny(comfyui).build(arch)
    ref = _sample(comfyui, base, arch, steps=12, seed=4, size=24, cfg=cfg)
    dec = _calibrate(comfyui, base, arch, steps=12, correction=True, seed=0, size=24, batch=2, cfg=cfg)
    plain = _calibrate(comfyui, base, arch, steps=12, correction=False, name="plain", seed=0, size=24, batch=2, cfg=cfg)
    errs = {}
    for label, sch in (("dec", dec), ("plain", type(dec)(dec.full, {}, dec.keys, dec.name)), ("dps-l2", plain)):
        out = _sample(comfyui, _cache(comfyui, base, arch, schedule=sch), arch, steps=12, seed=4, size=24, cfg=cfg)
        errs[label] = float((out - ref).norm() / ref.norm())
    print(arch, cfg, errs)
    if cfg == 1.0 and arch in ("lumina2", "hidream", "cosmos_predict2"):   # DEC helps less on these tiny networks:
        # measured lumina2 0.00576 vs 0.00609 (0.91-0.95 with other spans), hidream 0.00195 vs 0.00210 (this span
        # crossing into the joined stream; 0.72-0.74 on one block), cosmos_predict2 0.00359 vs 0.00411 (0.87-0.90)
        assert errs["dec"] < 0.97 * errs["plain"]
    elif cfg == 1.0:        # measured: flux 0.00299 vs 0.00421, sd3 0.00084 vs 0.00229, wan 0.00229 vs 0.00347
        assert errs["dec"] < 0.75 * errs["plain"]
    else:                   # with CFG 3 the per-branch fit is about neutral on these random models: never 10% worse
        assert errs["dec"] < 1.1 * errs["plain"]


def test_batch_rows_are_independent_and_chunking_does_not_matter(comfyui, monkeypatch):
    tiny = _tiny(comfyui)
    base = tiny.build("flux")
    model = _cache(comfyui, base, "flux")
    pos = [[torch.cat([tiny.conditioning("flux", s)[0][0] for s in (1, 7)]),
            {"pooled_output": torch.cat([tiny.conditioning("flux", s)[0][1]["pooled_output"] for s in (1, 7)])}]]
    import comfy.sample

    latent = torch.zeros(2, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))
    two = comfy.sample.sample(model, noise, 8, 3.0, "euler", "simple", pos, tiny.conditioning("flux", 2), latent,
                              seed=4, disable_pbar=True)
    for row, s in enumerate((1, 7)):
        one = comfy.sample.sample(model, noise[row:row + 1], 8, 3.0, "euler", "simple", tiny.conditioning("flux", s),
                                  tiny.conditioning("flux", 2), latent[:1], seed=4, disable_pbar=True)
        assert torch.allclose(two[row:row + 1], one, rtol=1e-4, atol=1e-5)
    counted, rows = count_rows(model)
    together = _sample(comfyui, counted, "flux", batch=2)
    assert rows == [4] * 8                                            # cond and uncond in one chunk
    rows.clear()
    monkeypatch.setattr(base.model, "memory_required", lambda *a, **k: float("inf"))   # now they run apart
    apart = _sample(comfyui, counted, "flux", batch=2)
    assert rows == [2] * 16
    assert torch.allclose(together, apart, rtol=1e-4, atol=1e-5)


def test_second_run_at_other_size_and_batch_matches_a_fresh_model(comfyui):
    base = _tiny(comfyui).build("wan")
    model = _cache(comfyui, base, "wan")
    _sample(comfyui, model, "wan", size=8, batch=1)
    second = _sample(comfyui, model, "wan", size=12, batch=2, seed=9)
    fresh = _sample(comfyui, _cache(comfyui, _tiny(comfyui).build("wan"), "wan"), "wan", size=12, batch=2, seed=9)
    assert torch.equal(second, fresh)


def test_schedule_saved_loaded_and_refused_for_other_model_or_steps(comfyui, models_dir):
    tiny = _tiny(comfyui)
    base = tiny.build("flux")
    sch = _calibrate(comfyui, base, "flux", steps=8)
    assert sum(sch.full) == 3 and sch.full[0] == 1                   # ceil(8 / 3) full steps, the first one full
    assert (models_dir / "cache_quant" / "cq.safetensors").is_file()
    loaded = _node(comfyui, "TrainFreeCacheQuantLoad").load("cq.safetensors")[0]
    assert loaded.full == sch.full and all(torch.equal(loaded.corr[k][0], sch.corr[k][0]) for k in sch.corr)
    assert torch.equal(_sample(comfyui, _cache(comfyui, base, "flux", schedule=loaded), "flux"),
                       _sample(comfyui, _cache(comfyui, base, "flux", schedule=sch), "flux"))
    with pytest.raises(ValueError, match="calibrated for another model .*model: calibrated for"):
        _cache(comfyui, tiny.build("flux", seed=3), "flux", schedule=loaded)
    with pytest.raises(ValueError, match="calibrated for 8 steps, this run has 10 steps"):
        _sample(comfyui, _cache(comfyui, base, "flux", schedule=loaded), "flux", steps=10)


def test_unsupported_models_and_stacked_caches_are_refused(comfyui):
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    tiny = _tiny(comfyui)
    for arch in ("sd15", "sdxl"):
        with pytest.raises(ValueError, match="not supported.*Flux, Chroma, SD3.*Wan.*HunyuanVideo.*Qwen-Image"):
            _node(comfyui, "TrainFreeDiTCache").patch(tiny.build(arch), 3, 1, 1)
    with pytest.raises(ValueError, match=r"\(AnimateWanModel\) is not supported \(Animate adds its face features "
                                         r"between the blocks, computed from the stream a block cache would skip\)"):
        _node(comfyui, "TrainFreeDiTCache").patch(tiny.build("wan_animate"), 3, 1, 0)
    import comfy.ldm.wan.model as wan_model

    future = tiny.build("wan")         # a Wan variant this ComfyUI does not have yet
    future.model.diffusion_model.__class__ = type("FutureWanModel", (wan_model.WanModel,), {})
    with pytest.raises(ValueError, match=r"\(a Wan variant, FutureWanModel, this cache has not been tested on\)"):
        _node(comfyui, "TrainFreeDiTCache").patch(future, 3, 1, 0)
    base = tiny.build("flux")
    for node in (EasyCacheNode, LazyCacheNode):
        with pytest.raises(ValueError, match="EasyCache or LazyCache"):
            _cache(comfyui, node.execute(base, 0.2, 0.15, 0.95, False)[0], "flux")
        after = node.execute(_cache(comfyui, base, "flux"), 0.2, 0.15, 0.95, False)[0]
        with pytest.raises(ValueError, match="cannot be stacked"):
            _sample(comfyui, after, "flux")
    with pytest.raises(ValueError, match="already has a TrainFree DiT cache"):
        _cache(comfyui, _cache(comfyui, base, "flux"), "flux")
    with pytest.raises(ValueError, match="must leave at least one block"):
        _node(comfyui, "TrainFreeDiTCache").patch(base, 3, 2, 2)


def test_interrupted_run_leaves_nothing_behind(comfyui, models_dir):
    import comfy.model_management
    import comfy.patcher_extension as pe
    import comfy.sample

    mod = comfyui.module_of("TrainFreeDiTCache")
    tiny = _tiny(comfyui)
    base = tiny.build("flux")
    model = _cache(comfyui, base, "flux").clone()
    runs = []

    def grab(executor, *args, **kwargs):
        runs.append(args[-1]["transformer_options"][mod.RUN])
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "grab", grab)

    def stop(step, *a):
        if step == 4:
            raise comfy.model_management.InterruptProcessingException()

    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        comfy.sample.sample(model, noise, 8, 3.0, "euler", "simple", tiny.conditioning("flux", 1),
                            tiny.conditioning("flux", 2), latent, callback=stop, seed=4, disable_pbar=True)
    assert runs and runs[-1].entries == {} and runs[-1].current is None
    assert mod.RUN not in model.model_options["transformer_options"]
    assert torch.equal(_sample(comfyui, model, "flux"), _sample(comfyui, _cache(comfyui, base, "flux"), "flux"))
    with pytest.raises(comfy.model_management.InterruptProcessingException):   # calibration: no file left
        comfy.model_management.interrupt_current_processing(True)
        try:
            _calibrate(comfyui, base, "flux", name="stopped")
        finally:
            comfy.model_management.interrupt_current_processing(False)
    assert not list(models_dir.rglob("*stopped*"))


def _graph(arch="flux", steps=6, cfg=4.0, nodes=()):
    return patched_ksampler(nodes, prefix="n", arch=arch, steps=steps, cfg=cfg, scheduler="simple", seed=3)


def test_composes_with_adaptive_guidance_and_reports_in_the_ui(comfyui, monkeypatch):
    import server

    sent = []

    class _Stub:
        def send_progress_text(self, text, node_id, sid=None):
            sent.append((node_id, text))

    monkeypatch.setattr(server.PromptServer, "instance", _Stub(), raising=False)
    cache = ("TrainFreeDiTCache", {"interval": 3, "head_blocks": 1, "tail_blocks": 1})
    ok, plain, err = comfyui.run(_graph(nodes=[cache]))
    assert ok, err
    assert sent and sent[-1][0] == "n0" and "measured speed-up" in sent[-1][1] and "4 cached evaluations" in sent[-1][1]
    ag_off = ("TrainFreeAdaptiveGuidance", {"threshold": 1.0})                # AG that never switches off
    for order in ([cache, ag_off], [ag_off, cache]):
        ok, out, err = comfyui.run(_graph(nodes=order))
        assert ok, err
        assert out["stats"]["sum"] == plain["stats"]["sum"]
    for order in ([cache, ("TrainFreeAdaptiveGuidance", {"threshold": 0.5})],
                  [("TrainFreeAdaptiveGuidance", {"threshold": 0.5}), cache]):
        ok, out, err = comfyui.run(_graph(nodes=order))
        assert ok, err
        assert "finite=True" in out["stats"]["text"][0] and out["stats"]["sum"] != plain["stats"]["sum"]
    ok, out, err = comfyui.run(_graph(arch="sd15", nodes=[cache]))
    assert not ok and "not supported" in str(err)


def test_calibrate_node_in_a_graph_advances_the_progress_bar(comfyui, models_dir):
    import comfy.utils as cu

    seen = []
    old = cu.PROGRESS_BAR_HOOK
    cu.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    p = _graph(arch="sd3", steps=7)
    p["cal"] = {"class_type": "TrainFreeCacheQuantCalibrate", "inputs": {
        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
        "seed": 0, "steps": 7, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "interval": 2,
        "head_blocks": 1, "tail_blocks": 0, "correction": True, "step_weighting": True, "name": "graph",
        "overwrite": True}}
    p["cache"] = {"class_type": "TrainFreeDiTCache", "inputs": {"model": ["ckpt", 0], "interval": 3, "head_blocks": 1,
                                                                "tail_blocks": 1, "schedule": ["cal", 0]}}
    p["ks"]["inputs"]["model"] = ["cache", 0]
    try:
        ok, out, err = comfyui.run(p)
    finally:
        cu.set_progress_bar_global_hook(old)
    assert ok, err
    assert [v for v, t in seen if t == 7][:7] == list(range(1, 8))
    assert (models_dir / "cache_quant" / "graph.safetensors").is_file()


def test_two_expert_run_calibrated_per_step_range(comfyui, models_dir, caplog):
    """Wan 2.2-style: a high-noise model samples steps 0-4 of 8 with leftover noise, a low-noise model steps 4-8 from
    its output (KSamplerAdvanced's step ranges, add_noise off for the second); each expert's schedule is calibrated
    for its own part with start_at_step / end_at_step and fits that part only."""
    import comfy.sample

    tiny = _tiny(comfyui)
    high, low = tiny.build("wan", 0), tiny.build("wan", 1)
    pos, neg = tiny.conditioning("wan", 1), tiny.conditioning("wan", 2)
    latent = comfy.sample.fix_empty_latent_channels(high, torch.zeros(1, 4, 12, 12))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    cal = _node(comfyui, "TrainFreeCacheQuantCalibrate")

    def part(model, x, z, first, last):
        return comfy.sample.sample(model, z, 8, 3.0, "euler", "simple", pos, neg, x, start_step=first, last_step=last,
                                   force_full_denoise=False, seed=5, disable_pbar=True)

    def calibrate(model, x, first, last, add_noise, name):
        return cal.calibrate(model, pos, neg, {"samples": x}, 5, 8, 3.0, "euler", "simple", 2, 1, 0, True, name, True,
                             start_at_step=first, end_at_step=last, add_noise=add_noise)[0]

    ref1 = part(high, latent, noise, 0, 4)
    ref2 = part(low, ref1, torch.zeros_like(ref1), 4, 8)
    sch_high = calibrate(high, latent, 0, 4, True, "high")
    sch_low = calibrate(low, ref1, 4, 8, False, "low")
    assert len(sch_high.full) == len(sch_low.full) == 4 and sum(sch_high.full) == sum(sch_low.full) == 2
    assert sch_high.keys["steps_range"] == "0:4" and sch_low.keys["steps_range"] == "4:8"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainfree"):
        out1 = part(_node(comfyui, "TrainFreeDiTCache").patch(high, 2, 1, 0, schedule=sch_high)[0], latent, noise, 0, 4)
        out2 = part(_node(comfyui, "TrainFreeDiTCache").patch(low, 2, 1, 0, schedule=sch_low)[0], out1,
                    torch.zeros_like(out1), 4, 8)
    assert caplog.text.count("2 full and 2 cached evaluations") == 2, caplog.text
    assert "less well" not in caplog.text                        # each part's sigmas are the calibrated ones
    assert 0 < float((out2 - ref2).norm() / ref2.norm()) < 0.1
    with pytest.raises(ValueError, match=r"calibrated for steps 0-4 of 8 \(KSamplerAdvanced\), this run has 8 steps"):
        _sample(comfyui, _cache(comfyui, high, "wan", schedule=sch_high), "wan", steps=8)
    with pytest.raises(ValueError, match="start_at_step .4. must be below end_at_step .4."):
        calibrate(high, latent, 4, 4, True, "empty")
