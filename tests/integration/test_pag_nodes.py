"""TrainFreePAG in ComfyUI: equal to core's node on the middle block, chosen layers perturbed, DiTs, composition."""
import pytest
import torch


def _tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def _pag(comfyui, model, scale=3.0, layers="", start=0.0, end=1.0):
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreePAG"]().patch(model, scale, layers, start, end)[0]


def _sample(comfyui, model, arch="sd15", cfg=4.0, steps=4, batch=1, sampler="euler", pos_seed=1, neg_seed=2,
            size=(8, 8)):
    import comfy.sample

    tiny = _tiny(comfyui)
    shape = tiny.latent_shape(arch, batch, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", tiny.conditioning(arch, pos_seed, batch),
                               tiny.conditioning(arch, neg_seed, batch), torch.zeros(shape), seed=4, disable_pbar=True)


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "svd"])
@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_middle_block_equals_cores_node(comfyui, arch, cfg):
    """(SVD: its video U-Net's spatial self-attention, 3 frames; the temporal attention is left alone by both.)"""
    import comfy_extras.nodes_pag as core

    base = _tiny(comfyui).build(arch)
    batch = 3 if arch == "svd" else 1
    ours = _sample(comfyui, _pag(comfyui, base, 3.0, "middle.0"), arch, cfg, batch=batch)
    theirs = _sample(comfyui, core.PerturbedAttentionGuidance.execute(base, 3.0)[0], arch, cfg, batch=batch)
    assert torch.equal(ours, theirs)
    assert torch.equal(_sample(comfyui, _pag(comfyui, base, 3.0), arch, cfg, batch=batch), ours)   # default: middle.0
    assert not torch.equal(ours, _sample(comfyui, base, arch, cfg, batch=batch))


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3", "flux", "wan", "wan_i2v", "wan_vace", "chroma",
                                  "chroma_radiance", "qwen_image", "ltxv", "hunyuan_video", "hunyuan_image", "lumina2"])
def test_scale_zero_is_unpatched_and_guidance_changes_the_result(comfyui, arch):
    base = _tiny(comfyui).build(arch)
    plain = _sample(comfyui, base, arch)
    assert torch.equal(_sample(comfyui, _pag(comfyui, base, 0.0), arch), plain)
    guided = _sample(comfyui, _pag(comfyui, base, 3.0), arch)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4
    outside = _sample(comfyui, _pag(comfyui, base, 3.0, start=1.0, end=1.0), arch)     # range holds no step
    assert torch.equal(outside, plain)


def test_only_the_chosen_unet_layers_are_perturbed(comfyui):
    """attn1 modules run as modules in the normal pass; in the perturbed pass a replaced one is bypassed."""
    import comfy.ldm.modules.attention as attention

    base = _tiny(comfyui).build("sd15")
    calls = {}
    dm = base.model.diffusion_model
    hooks = []
    for name, mod in dm.named_modules():
        if isinstance(mod, attention.BasicTransformerBlock):
            calls[name] = 0
            hooks.append(mod.attn1.register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1)))
    try:
        _sample(comfyui, _pag(comfyui, base, 3.0, "input.1, output.3"), steps=3)
    finally:
        for h in hooks:
            h.remove()
    perturbed = {n for n in calls if n.startswith(("input_blocks.1.", "output_blocks.3."))}
    assert len(perturbed) == 2 and len(calls) > 3
    assert all(calls[n] == (3 if n in perturbed else 6) for n in calls), calls      # 3 steps x (CFG pass + PAG pass)


@pytest.mark.parametrize("arch,layers,per_pass", [("flux", "double.1, single.0", 2), ("flux", "single.1", 1),
                                                  ("chroma", "double.1, single.0", 2), ("chroma", "single.1", 1),
                                                  ("chroma_radiance", "single.0-1", 2),
                                                  ("qwen_image", "block.0, block.2", 2),
                                                  ("sd3", "joint.0-1", 2), ("wan", "block.1", 1),
                                                  ("ltxv", "block.0, block.2", 2),
                                                  ("hunyuan_video", "double.1, single.0", 2),
                                                  ("hunyuan_video", "single.1", 1),
                                                  ("hunyuan_image", "double.0, single.1", 2)])
def test_dit_layers_are_perturbed_once_per_step(comfyui, monkeypatch, arch, layers, per_pass):
    base = _tiny(comfyui).build(arch)
    mod = comfyui.module_of("TrainFreePAG")
    seen = []
    real = mod._perturbed_attention

    def spy(rows, *a, **kw):
        n = (a[0].shape[-2] if kw.get("skip_reshape") else a[0].shape[1])
        seen.append(rows(n))
        return real(rows, *a, **kw)

    monkeypatch.setattr(mod, "_perturbed_attention", spy)
    _sample(comfyui, _pag(comfyui, base, 2.0, layers), arch, steps=3)
    assert len(seen) == 3 * per_pass
    if arch in ("wan", "ltxv"):
        assert all(r is None for r in seen)                 # pure self-attention: output = V
        return
    txt = _tiny(comfyui).COND_SHAPES[arch][0]
    hunyuan = arch.startswith("hunyuan")           # image tokens first
    n, m = (64, 60) if arch == "hunyuan_image" else (16, 15)    # 8x8 latent, patch 2 (HunyuanImage: 1) -> 16 (64)
    assert all(r == ((0, n) if hunyuan else (txt, txt + n)) for r in seen), seen
    seen.clear()            # a second run at another size: the image rows follow it (6x9: 3 x 5 patches, padded;
    # HunyuanVideo itself takes even sizes only: 6x10)
    _sample(comfyui, _pag(comfyui, base, 2.0, layers), arch, steps=2, size=(6, 10) if hunyuan else (6, 9))
    assert len(seen) == 2 * per_pass and all(r == ((0, m) if hunyuan else (txt, txt + m)) for r in seen), seen


@pytest.mark.parametrize("arch", ["wan", "wan_i2v", "ltxv"])
def test_perturbed_pass_is_self_attention_replaced_by_v(comfyui, arch):
    """Independent check: the perturbed prediction equals the model whose block-0 self-attention returns o(v(x))."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    mod = comfyui.module_of("TrainFreePAG")
    x = torch.randn(1, 128 if arch == "ltxv" else 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    ctx, cond = tiny.conditioning(arch, 1)[0]
    extra = {"attention_mask": cond["attention_mask"], "frame_rate": 25} if arch == "ltxv" else {}
    if arch == "wan_i2v":            # no start image latent (mask + zeros), the image's CLIP-vision tokens
        extra = {"c_concat": torch.zeros(1, 20, 2, 8, 8),
                 "clip_fea": cond["clip_vision_output"].penultimate_hidden_states}
    opts = mod.perturbed_options(base.model_options, mod.architecture(base), [("block", 0, None)])

    def run(to):
        return base.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=dict(to), **extra)

    ours = run(opts["transformer_options"])
    plain = run(base.model_options["transformer_options"])
    monkeypatch = pytest.MonkeyPatch()
    if arch.startswith("wan"):
        attn = base.model.diffusion_model.blocks[0].self_attn
        monkeypatch.setattr(attn, "forward", lambda x, freqs, transformer_options={}: attn.o(attn.v(x)))
    else:
        attn = base.model.diffusion_model.transformer_blocks[0].attn1
        monkeypatch.setattr(attn, "forward", lambda x, context=None, mask=None, pe=None, transformer_options={}:
                            attn.to_out(attn.to_v(x)))
    try:
        manual = run(base.model_options["transformer_options"])
    finally:
        monkeypatch.undo()
    torch.testing.assert_close(ours, manual, rtol=0, atol=1e-6)
    assert (ours - plain).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_batch_of_different_prompts_equals_single_runs(comfyui, arch):
    import comfy.sample

    tiny = _tiny(comfyui)
    model = _pag(comfyui, tiny.build(arch), 3.0)
    c = 16 if arch == "flux" else 4
    noise = torch.randn(2, c, 8, 8, generator=torch.Generator().manual_seed(7))
    pos, neg = tiny.conditioning(arch, 1, 2), tiny.conditioning(arch, 2, 2)

    def run(p, n, z):
        return comfy.sample.sample(model, z, 4, 4.0, "euler", "normal", p, n, torch.zeros_like(z), seed=7,
                                   disable_pbar=True)

    both = run(pos, neg, noise)
    for i in range(2):
        one = run([[pos[0][0][i:i + 1], {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in pos[0][1].items()}]],
                  [[neg[0][0][i:i + 1], {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in neg[0][1].items()}]],
                  noise[i:i + 1])
        # batching alone moves float32 results by ~1e-6 relative (the unpatched model too); leaks would be O(1)
        torch.testing.assert_close(both[i:i + 1], one, rtol=0, atol=1e-5 * float(one.abs().max()))


def test_chains_with_adaptive_guidance_a_cache_and_an_earlier_block_patch(comfyui):
    import comfy_extras.nodes_easycache as easycache

    tiny = _tiny(comfyui)
    base = tiny.build("flux")
    hits = []

    def earlier(args, extra):                    # another node's DiT block patch on the same block
        hits.append(args["transformer_options"].get("trainfree_perturbed"))
        return extra["original_block"](args)

    chained = base.clone()
    chained.set_model_patch_replace(earlier, "dit", "double_block", 1)
    ag = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeAdaptiveGuidance"]().patch(chained, 0.9999)[0]
    model = _pag(comfyui, ag, 3.0, "double.1")
    out = _sample(comfyui, model, "flux", steps=4)
    assert torch.isfinite(out).all()
    assert hits.count("pag") == 4 and hits.count(None) == 4          # perturbed and normal passes both chain
    cached = easycache.EasyCacheNode.execute(model, 0.2, 0.0, 1.0, False)[0]
    assert torch.isfinite(_sample(comfyui, cached, "flux", steps=6)).all()
    two = _pag(comfyui, _pag(comfyui, base, 2.0, "single.0"), 1.0, "double.0")       # two PAG nodes stack
    assert torch.isfinite(_sample(comfyui, two, "flux")).all()


def test_refusals_at_queue_time(comfyui):
    tiny = _tiny(comfyui)
    refused = [("sd15", "output.9", r"no attention layer output\.9.*input\.1, input\.3, middle\.0, output\.0, "
                                    r"output\.1"),
               ("sd15", "double.0", r"do not apply to this unet model"),
               ("flux", "double.5", r"double\.0, double\.1, single\.0, single\.1"),
               ("sd3", "joint 1", "not understood"),
               ("qwen_image", "double.0", r"do not apply to this qwen_image model; it takes block\.N"),
               ("qwen_image", "block.3", r"block\.0, block\.1, block\.2$"),
               ("hunyuan_video", "block.0", r"do not apply to this hunyuan_video model; it takes double\.N, single\.N")]
    for arch, layers, message in refused:
        with pytest.raises(ValueError, match=message):
            _pag(comfyui, tiny.build(arch), 3.0, layers)
    odd = tiny.build("sd15")
    odd.model.diffusion_model = torch.nn.Identity()
    with pytest.raises(ValueError, match="supports UNet models .*network is Identity.*SkipLayerGuidanceDiT"):
        _pag(comfyui, odd, 3.0)
    from prompts import ksampler

    prompt = ksampler("euler", steps=2)
    prompt["pag"] = {"class_type": "TrainFreePAG", "inputs": {"model": ["ckpt", 0], "scale": 3.0, "layers": "middle.7",
                                                             "start_percent": 0.0, "end_percent": 1.0}}
    prompt["ks"]["inputs"]["model"] = ["pag", 0]
    ok, _, err = comfyui.run(prompt)
    assert not ok and "no attention layer middle.7" in str(err)


def test_the_perturbed_pass_has_its_own_cond_uuid_for_caches(comfyui):
    """Caches keyed by cond uuid (EasyCache, LazyCache) must not take the perturbed prediction for the conditional
    one: the perturbed pass carries a uuid derived from the cond's (stable over the run) and a marker."""
    import comfy.patcher_extension as pe

    seen = []

    def spy(executor, *args, **kwargs):
        to = args[-1] if isinstance(args[-1], dict) else kwargs["transformer_options"]
        seen.append((tuple(to["uuids"]), to.get("trainfree_perturbed")))
        return executor(*args, **kwargs)

    model = _pag(comfyui, _tiny(comfyui).build("flux"), 3.0)
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "spy", spy)
    _sample(comfyui, model, "flux", steps=3)
    normal = [u for u, mark in seen if mark is None]
    perturbed = [u for u, mark in seen if mark == "pag"]
    assert len(normal) == len(perturbed) == 3 and len(set(normal)) == len(set(perturbed)) == 1
    assert not set(normal[0]) & set(perturbed[0])


def test_identity_wins_over_an_earlier_exact_key_attn1_replace(comfyui):
    """Another node's attn1 replace keyed (block, id, transformer index) would shadow a (block, id) key: PAG uses
    exact keys, so its perturbed pass still perturbs (and the other replace still runs in the normal passes)."""
    import comfy.ldm.modules.attention as attention

    base = _tiny(comfyui).build("sd15")
    calls = []

    def other(q, k, v, extra_options):
        calls.append(1)
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    m = base.clone()
    m.set_model_attn1_replace(other, "middle", 0, 0)
    plain_with_other = _sample(comfyui, m, steps=3)
    pag = _sample(comfyui, _pag(comfyui, m, 3.0, "middle.0"), steps=3)
    assert len(calls) == 3 + 3                           # 3 steps alone, 3 steps CFG pass with PAG (not its pass)
    import comfy_extras.nodes_pag as core

    assert torch.equal(pag, _sample(comfyui, core.PerturbedAttentionGuidance.execute(base, 3.0)[0], steps=3))
    assert not torch.equal(pag, plain_with_other)
