"""TrainFreeNASA in ComfyUI: exactness at alpha 0 / outside its range, a second size, the claimed effect (farther
from the negative prompt's sample), batches, CFG rows, composition, refusals (the per-layer formula and the text
streams per family: test_nasa_layers.py)."""
import logging
import re

import pytest
import torch
from nasa_cases import DITS
from nasa_cases import nasa as _nasa
from nasa_cases import noise as _noise
from nasa_cases import sample as _sample
from nasa_cases import tiny as _tiny
from test_nodes import tiny_models


@pytest.mark.parametrize("arch", ["sd15", "sdxl", *DITS])
def test_alpha_zero_and_an_empty_range_leave_the_model_alone(comfyui, arch):
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, neg, noise = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), _noise(arch)
    plain = _sample(base, pos, neg, noise)
    assert torch.equal(_sample(_nasa(comfyui, base, neg, 0.0), pos, neg, noise), plain)
    off = _sample(_nasa(comfyui, base, neg, 0.5, 1.0, 1.0), pos, neg, noise)     # patched, but no step in range
    if arch in DITS:   # the negative tokens still ride along (larger matmuls): float32 rounding
        torch.testing.assert_close(off, plain, rtol=0, atol=1e-5 * float(plain.abs().max()))
    else:                # UNet: the replace path with nothing to do is the module's own computation
        assert torch.equal(off, plain)
    on = _sample(_nasa(comfyui, base, neg, 0.5), pos, neg, noise)
    assert torch.isfinite(on).all() and (on - plain).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["sd15", *DITS])
def test_a_second_run_at_another_size_equals_a_fresh_model(comfyui, arch):
    """What NASA reads per forward (Qwen-Image's text start, HunyuanVideo's timesteps and image length, rotary
    tables) follows the latent size: one patched model sampled at 8x8, 12x12, then 8x8 again (PixArt: 40, 48, 40)
    gives what a freshly patched model gives at each size."""
    tiny = _tiny(comfyui)
    base, neg, pos = tiny.build(arch), tiny.conditioning(arch, 2), tiny.conditioning(arch, 1)

    def noise(size):
        return torch.randn(tiny_models.latent_shape(arch, 1, (size, size)), generator=torch.Generator().manual_seed(3))
    model = _nasa(comfyui, base, neg)
    sizes = (40, 48, 40) if arch == "pixart" else (8, 12, 8)
    runs = [_sample(model, pos, pos, noise(n), steps=2) for n in sizes]
    for n, got in zip(sizes, runs):
        assert torch.equal(got, _sample(_nasa(comfyui, base, neg), pos, pos, noise(n), steps=2)), n


@pytest.mark.parametrize("arch,least", [("sd15", 1.1), ("sdxl", 1.1), ("flux", 1.0), ("wan", 1.05), ("chroma", 1.3),
                                        ("chroma_radiance", 1.3), ("qwen_image", 1.3), ("ltxv", 1.3),
                                        ("hunyuan_video", 1.0), ("hunyuan_image", 2.0), ("wan_i2v", 1.3),
                                        ("wan_vace", 1.3), ("auraflow", 1.5), ("hidream", 1.3),
                                        ("cosmos_predict2", 1.2), ("lumina2", 1.3),
                                        ("omnigen2", 1.2), ("pixart", 1.2)])
@pytest.mark.parametrize("steps", [1, 4])
def test_the_sample_moves_away_from_the_negative_prompts_sample(comfyui, arch, least, steps):
    """The paper's claim on a model where it can be measured: at cfg 1, |x_NASA - x_neg| / |x_pos - x_neg| > 1,
    x_neg being the sample of the negative prompt itself (alpha 0.5, per seed; measured 1.22-1.38 on the UNets,
    1.00-1.12 on Flux, 1.78 on average on Wan, 1.48-1.83 on Chroma, 1.44-1.88 on Chroma Radiance, 1.57-1.70 on
    Qwen-Image, 1.04-1.08 on HunyuanVideo, 2.5-2.8 on HunyuanImage 2.1, 1.69-2.12 on Wan image-to-video, 1.57-1.91
    on Wan VACE, 1.62-2.15 on AuraFlow, 1.36-1.45 on HiDream, 1.25-1.35 on Cosmos-Predict2, 1.35-1.76 on Lumina 2,
    1.27-1.75 on OmniGen2, 1.34-1.85 on PixArt-alpha, the paper's family; see bench/nasa.py). Tiny random SD3 shows
    no such effect (1.00: NASA moves its sample
    sideways), so it is not asserted there. On HiDream the negative shares the positive's pooled vector: in the tiny
    model that vector, which modulates every block and which NASA leaves to the positive prompt on every DiT, makes
    most of the two prompts' difference (|x_pos - x_neg| 5% of |x_pos| with the negative's own pooled vector, 1%
    without; the ratio is then 1.00, measuring the pooled vector's effect)."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    ratios = []
    for seed in range(3):
        pos, neg, noise = tiny.conditioning(arch, 100 + seed), tiny.conditioning(arch, 200 + seed), _noise(arch, 1, seed)
        if arch == "hidream":
            neg = [[neg[0][0], dict(neg[0][1], pooled_output=pos[0][1]["pooled_output"])]]
        x_pos, x_neg = _sample(base, pos, pos, noise, steps), _sample(base, neg, neg, noise, steps)
        x_nasa = _sample(_nasa(comfyui, base, neg, 0.5), pos, pos, noise, steps)
        ratios.append(float((x_nasa - x_neg).norm() / (x_pos - x_neg).norm()))
    assert min(ratios) > least and sum(ratios) / 3 > least + 0.02, ratios


@pytest.mark.parametrize("arch", ["sd15", "sd3", "flux", "wan", "wan_i2v", "chroma", "qwen_image", "ltxv",
                                  "hunyuan_video", "wan_vace", "hidream", "cosmos_predict2", "pixart"])
def test_batch_with_different_prompts_and_negatives_equals_single_runs(comfyui, arch):
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, neg, noise = tiny.conditioning(arch, 1, 2), tiny.conditioning(arch, 2, 2), _noise(arch, 2, 7)
    both = _sample(_nasa(comfyui, base, neg), pos, pos, noise)

    def item(c, i):
        return [[c[0][0][i:i + 1], {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in c[0][1].items()}]]

    for i in range(2):
        one = _sample(_nasa(comfyui, base, item(neg, i)), item(pos, i), item(pos, i), noise[i:i + 1])
        torch.testing.assert_close(both[i:i + 1], one, rtol=0, atol=1e-5 * float(one.abs().max()))
    shared = _sample(_nasa(comfyui, base, item(neg, 0)), pos, pos, noise)     # one negative for the whole batch
    assert not torch.allclose(shared[1], both[1])


@pytest.mark.parametrize("arch", ["sd15", "sd3", "flux", "wan", "wan_i2v", "chroma", "qwen_image", "ltxv",
                                  "hunyuan_video", "hidream", "cosmos_predict2", "lumina2", "omnigen2", "pixart"])
def test_with_cfg_only_the_conditional_branch_is_steered(comfyui, arch):
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, neg, noise = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), _noise(arch)
    captured = {}

    def capture(name, model):
        m = model.clone()

        def fn(args):
            captured.setdefault(name, (args["cond_denoised"].clone(), args["uncond_denoised"].clone()))
            return args["denoised"]
        m.set_model_sampler_post_cfg_function(fn)
        return m

    _sample(capture("plain", base), pos, neg, noise, steps=2, cfg=3.0)
    _sample(capture("nasa", _nasa(comfyui, base, tiny.conditioning(arch, 3))), pos, neg, noise, steps=2, cfg=3.0)
    (c0, u0), (c1, u1) = captured["plain"], captured["nasa"]
    torch.testing.assert_close(u1, u0, rtol=0, atol=1e-5 * float(u0.abs().max()))   # first step: same x
    assert (c1 - c0).abs().max() > 1e-3


def test_empty_negative_and_composition_with_pag_adaptive_guidance_and_a_cache(comfyui, monkeypatch):
    import comfy_extras.nodes_easycache as easycache

    tiny = _tiny(comfyui)
    nodes = comfyui.nodes.NODE_CLASS_MAPPINGS
    for arch in ("sd15", "flux", "sd3", "chroma", "qwen_image", "hunyuan_video"):
        base = tiny.build(arch)
        pos, noise = tiny.conditioning(arch, 1), _noise(arch)
        empty = [[torch.zeros_like(pos[0][0]), {}]]                  # a ConditioningZeroOut negative
        zeroed, plain = _sample(_nasa(comfyui, base, empty), pos, pos, noise), _sample(base, pos, pos, noise)
        if arch == "sd15":        # bias-free to_k / to_v: K- = V- = 0, so Z- = 0 and nothing changes
            torch.testing.assert_close(zeroed, plain, rtol=0, atol=1e-5 * float(plain.abs().max()))
        elif arch == "flux":      # Flux's txt_in has a bias: a zero prompt is still a prompt
            assert torch.isfinite(zeroed).all() and not torch.allclose(zeroed, plain)
        layers = {"sd15": "middle.0", "flux": "double.1, single.0", "sd3": "joint.0-1", "chroma": "double.1, single.0",
                  "qwen_image": "block.0-1", "hunyuan_video": "double.0, single.0"}[arch]
        for first in ("nasa", "pag"):         # SD3: PAG once took NASA's negative-text sub-calls for image ones
            if first == "pag":
                both = _nasa(comfyui, nodes["TrainFreePAG"]().patch(base, 2.0, layers, 0.0, 1.0)[0],
                             tiny.conditioning(arch, 2))
            else:
                both = nodes["TrainFreePAG"]().patch(_nasa(comfyui, base, tiny.conditioning(arch, 2)), 2.0, layers,
                                                     0.0, 1.0)[0]
            assert torch.isfinite(_sample(both, pos, pos, noise, steps=3, cfg=1.0)).all()
        model = nodes["TrainFreePAG"]().patch(_nasa(comfyui, base, tiny.conditioning(arch, 2)), 2.0, layers, 0.0, 1.0)[0]
        model = nodes["TrainFreeAdaptiveGuidance"]().patch(model, 0.9999)[0]
        model = easycache.EasyCacheNode.execute(model, 0.2, 0.0, 1.0, False)[0]
        assert torch.isfinite(_sample(model, pos, tiny.conditioning(arch, 2), noise, steps=5, cfg=3.0)).all()
    pag_mod = comfyui.module_of("TrainFreePAG")
    seen = []
    real = pag_mod._perturbed_attention

    def spy(rows, *a, **kw):
        seen.append(rows(a[0].shape[-2]))
        return real(rows, *a, **kw)

    monkeypatch.setattr(pag_mod, "_perturbed_attention", spy)
    for arch, layers in (("flux", "double.0, single.1"), ("chroma", "double.0, single.1"),
                         ("qwen_image", "block.0, block.2"), ("hunyuan_video", "double.0, single.1")):
        for pag_first in (False, True):
            seen.clear()
            base = tiny.build(arch)
            neg = tiny.conditioning(arch, 2)
            model = nodes["TrainFreePAG"]().patch(_nasa(comfyui, base, neg) if not pag_first else base, 2.0, layers,
                                                  0.0, 1.0)[0]
            model = _nasa(comfyui, model, neg) if pag_first else model
            _sample(model, tiny.conditioning(arch, 1), tiny.conditioning(arch, 1), _noise(arch), steps=2)
            # PAG sees the positive sequence [16 text; 16 image] (HunyuanVideo: [16 image; 16 text]) inside NASA's split
            assert seen == [(0, 16) if arch == "hunyuan_video" else (16, 32)] * 4, (arch, pag_first)


@pytest.mark.parametrize("arch", ["hidream", "cosmos_predict2", "lumina2"])   # OmniGen2 calls no DIFFUSION_MODEL
def test_beside_core_easycache(comfyui, caplog, arch):
    """Where NASA is a DIFFUSION_MODEL wrapper (no block patches), core's EasyCache applied after it skips whole
    forwards inside that wrapper: steps are skipped, the run ends normally (a forward with no attention call is not a
    network that calls attention differently) and NASA still acts (cfg 1, as the distilled models run). (OmniGen2's
    network calls no DIFFUSION_MODEL wrapper in ComfyUI 0.3.64, where core's EasyCache sits, so it skips nothing
    there.)"""
    from comfy_extras.nodes_easycache import EasyCacheNode

    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, neg, noise = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), _noise(arch)
    with caplog.at_level(logging.INFO):
        cached = _sample(EasyCacheNode.execute(_nasa(comfyui, base, neg), 0.2, 0.0, 1.0, False)[0], pos, pos, noise,
                         steps=10)
    skipped = [int(n) for n in re.findall(r"EasyCache - skipped (\d+)/10 steps", caplog.text)]
    assert skipped and skipped[-1] > 0
    plain = _sample(EasyCacheNode.execute(base, 0.2, 0.0, 1.0, False)[0], pos, pos, noise, steps=10)
    assert torch.isfinite(cached).all() and (cached - plain).abs().max() > 1e-3 * plain.abs().max()


def test_refusals_at_queue_time(comfyui):
    tiny = _tiny(comfyui)
    odd = tiny.build("sd15")
    odd.model.diffusion_model = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"supports UNet .* Wan \(text-to-video, image-to-video, VACE, camera control, "
                                         r"HuMo, Animate\), LTX-Video, HunyuanVideo, AuraFlow, HiDream, "
                                         r"Cosmos-Predict2, Lumina 2, OmniGen2 and PixArt; this model's network "
                                         r"is Identity"):
        _nasa(comfyui, odd, tiny.conditioning("sd15", 2))
    import comfy.ldm.wan.model as wan_model

    future = tiny.build("wan")      # a Wan variant this ComfyUI does not have yet: its blocks may take other inputs
    future.model.diffusion_model.__class__ = type("FutureWanModel", (wan_model.WanModel,), {})
    with pytest.raises(ValueError, match="this model's network is FutureWanModel"):
        _nasa(comfyui, future, tiny.conditioning("wan", 2))
    with pytest.raises(ValueError, match="32 features per token, this model's text input takes 64"):
        _nasa(comfyui, tiny.build("sd15"), [[torch.zeros(1, 77, 32), {}]])
    for arch in ("sd3", "flux", "wan", "wan_i2v", "chroma", "qwen_image", "ltxv", "hunyuan_video", "lumina2",
                 "omnigen2"):
        with pytest.raises(ValueError, match="features per token"):
            _nasa(comfyui, tiny.build(arch), [[torch.zeros(1, 16, 48), {}]])
    from prompts import ksampler

    prompt = ksampler("euler", steps=2, cfg=1.0)
    prompt["nasa"] = {"class_type": "TrainFreeNASA", "inputs": {"model": ["ckpt", 0], "negative": ["neg", 0],
                                                               "alpha": 0.1, "start_percent": 0.9, "end_percent": 0.1}}
    prompt["ks"]["inputs"]["model"] = ["nasa", 0]
    ok, _, err = comfyui.run(prompt)
    assert not ok and "start_percent (0.9) is after end_percent (0.1)" in str(err)


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_one_graph_with_nasa_pag_adaptive_guidance_and_a_cache_through_sampler_custom_advanced(comfyui, arch):
    from prompts import custom_advanced

    prompt = custom_advanced("KSamplerSelect", {"sampler_name": "euler"}, arch=arch, steps=4, cfg=3.0)
    prompt["nasa"] = {"class_type": "TrainFreeNASA", "inputs": {"model": ["ckpt", 0], "negative": ["neg", 0],
                                                               "alpha": 0.2, "start_percent": 0.0, "end_percent": 1.0}}
    prompt["pag"] = {"class_type": "TrainFreePAG", "inputs": {"model": ["nasa", 0], "scale": 2.0, "layers": "",
                                                             "start_percent": 0.0, "end_percent": 0.8}}
    prompt["ag"] = {"class_type": "TrainFreeAdaptiveGuidance", "inputs": {"model": ["pag", 0], "threshold": 0.9999}}
    prompt["cache"] = {"class_type": "EasyCache", "inputs": {"model": ["ag", 0], "reuse_threshold": 0.2,
                                                             "start_percent": 0.0, "end_percent": 1.0, "verbose": False}}
    prompt["guider"]["inputs"]["model"] = ["cache", 0]
    ok, out, err = comfyui.run(prompt)
    assert ok, err
    assert "finite=True" in out["stats"]["text"][0]
    prompt["guider"]["inputs"]["model"] = ["ckpt", 0]
    ok, plain, err = comfyui.run(prompt)
    assert ok, err
    assert plain["stats"]["text"][0] != out["stats"]["text"][0]


def test_the_window_follows_a_shift_node_placed_after_nasa(comfyui, monkeypatch):
    """start/end percent become sigmas when sampling starts: ModelSamplingSD3 after NASA or before it gives
    the same window (it was fixed at patch time, so the window ended a step late after a shift)."""
    tiny = _tiny(comfyui)
    nasa_mod = comfyui.module_of("TrainFreeNASA")
    shift = comfyui.nodes.NODE_CLASS_MAPPINGS["ModelSamplingSD3"]()
    base, neg = tiny.build("sd3"), tiny.conditioning("sd3", 7, 1)
    real = nasa_mod._Window.rows

    def active(model):
        seen = []

        def spy(window, to, batch, device):
            rows = real(window, to, batch, device)
            seen.append((round(float(to["sigmas"].max()), 4), bool(rows.any())))
            return rows
        monkeypatch.setattr(nasa_mod._Window, "rows", spy)
        _sample(model, tiny.conditioning("sd3", 1), neg, _noise("sd3"), steps=8)
        monkeypatch.setattr(nasa_mod._Window, "rows", real)
        return sorted({s for s, on in seen if on}, reverse=True), sorted({s for s, _ in seen}, reverse=True)

    after, steps = active(shift.patch(_nasa(comfyui, base, neg, 0.5, 0.0, 0.5), 6.0)[0])
    before, _ = active(_nasa(comfyui, shift.patch(base, 6.0)[0], neg, 0.5, 0.0, 0.5))
    assert after == before and 0 < len(after) < len(steps)


@pytest.mark.parametrize("arch", ["sd15", *DITS])
def test_two_nasa_nodes_chain_without_seeing_each_others_negative(comfyui, arch):
    """Two negatives, one NASA node each: a second node with a vanishing alpha, after or before the first, leaves the
    first's result as it is (its tokens ride along unseen by the prompt and by the first negative); on the UNet the
    two terms add exactly: negatives equal to the prompt at alpha 0.2 and 0.3 give (1 - 0.5) Z+ at the first layer."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, noise = tiny.conditioning(arch, 1), _noise(arch)
    neg_a, neg_b = tiny.conditioning(arch, 2), tiny.conditioning(arch, 3)
    if arch.startswith("hunyuan"):    # padded negatives: each mask must land on its own tokens
        def padded(c, real):
            return [[c[0][0], dict(c[0][1], attention_mask=torch.tensor([[1] * real + [0] * (16 - real)]))]]
        neg_a, neg_b = padded(neg_a, 9), padded(neg_b, 13)
    one = _sample(_nasa(comfyui, base, neg_a, 0.3), pos, pos, noise, steps=2)
    for chained in (_nasa(comfyui, _nasa(comfyui, base, neg_a, 0.3), neg_b, 1e-7),
                    _nasa(comfyui, _nasa(comfyui, base, neg_b, 1e-7), neg_a, 0.3)):
        torch.testing.assert_close(_sample(chained, pos, pos, noise, steps=2), one, rtol=0,
                                   atol=1e-5 * float(one.abs().max()))
    if arch == "sd15":
        first = base.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_out[0]
        seen = []
        hook = first.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
        try:
            _sample(base, pos, pos, noise, steps=1)
            _sample(_nasa(comfyui, _nasa(comfyui, base, pos, 0.2), pos, 0.3), pos, pos, noise, steps=1)
        finally:
            hook.remove()
        torch.testing.assert_close(seen[1], 0.5 * seen[0], rtol=1e-6, atol=1e-6)
