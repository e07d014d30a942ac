"""TrainFreePAG on Lumina Image 2.0 (NextDiT: no block patches in ComfyUI 0.3.64, attention calls numbered per
forward): the chosen layer's joint attention equals an independent masked attention, one perturbed call per layer and
forward with each row's image tokens, and a clear stop where the call count differs."""
import shutil

import pytest
import torch


def _tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def _pag(comfyui, model, scale=3.0, layers=""):
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreePAG"]().patch(model, scale, layers, 0.0, 1.0)[0]


def _inputs(tiny, batch=1, masks=None):
    x = torch.randn(batch, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = tiny.conditioning("lumina2", 1, batch)[0][0]
    return x, ctx, torch.tensor(masks) if masks else None   # ComfyUI drops a mask that masks nothing


@pytest.mark.parametrize("layer", [0, 1])
def test_the_perturbed_layer_equals_an_independent_masked_attention(comfyui, monkeypatch, layer):
    """The perturbed prediction equals the model whose layer-N attention runs ComfyUI's own attention with an explicit
    mask hiding every other image key from each image query (caption keys and its own key stay visible)."""
    tiny = _tiny(comfyui)
    base = tiny.build("lumina2")
    mod = comfyui.module_of("TrainFreePAG")
    x, ctx, mask = _inputs(tiny)
    sigma = torch.tensor([0.6])
    opts = mod.perturbed_options(base.model_options, "lumina2", [("block", layer, None)],
                                 counts=mod.pag_lumina.layer_counts(base.model.diffusion_model))

    def run(to):
        return base.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=dict(to), attention_mask=mask,
                                      num_tokens=16)

    ours, plain = run(opts["transformer_options"]), run(base.model_options["transformer_options"])
    attn = base.model.diffusion_model.layers[layer].attention
    real = attn.forward
    n = 16 + 16
    hide = torch.zeros(n, n)
    hide[16:, 16:] = float("-inf")
    hide[range(16, n), range(16, n)] = 0.0
    monkeypatch.setattr(attn, "forward", lambda x_, x_mask, freqs_cis, transformer_options={}:
                        real(x_, hide.reshape(1, 1, n, n), freqs_cis, transformer_options=transformer_options))
    manual = run(base.model_options["transformer_options"])
    monkeypatch.undo()
    assert (ours - plain).abs().max() > 1e-4 and torch.allclose(ours, manual, rtol=0, atol=1e-5)


def test_one_perturbed_call_per_forward_on_the_image_tokens(comfyui, monkeypatch):
    """NextDiT puts the image right after the prompt's real tokens: with a 16-token prompt the perturbed rows are
    [16, 32), with one padded to 16 from 10 real tokens [10, 26); the other layer and the refiners are left alone.
    (A batch of prompts of different lengths fails inside ComfyUI 0.3.64's own NextDiT, with or without PAG.)"""
    tiny = _tiny(comfyui)
    base = tiny.build("lumina2")
    mod = comfyui.module_of("TrainFreePAG")
    seen = []
    real = mod.pag_lumina.pag_math.joint_identity_attention

    def spy(q, k, v, start, end, mask=None, **kw):
        seen.append((q.shape[0], start, end, mask is not None))
        return real(q, k, v, start, end, mask=mask, **kw)
    monkeypatch.setattr(mod.pag_lumina.pag_math, "joint_identity_attention", spy)
    counts = mod.pag_lumina.layer_counts(base.model.diffusion_model)
    opts = mod.perturbed_options(base.model_options, "lumina2", [("block", 1, None)], counts=counts)
    for masks, want in ((None, [(1, 16, 32, False)]), ([[1] * 10 + [0] * 6], [(1, 10, 26, True)])):
        seen.clear()
        x, ctx, mask = _inputs(tiny, 1, masks)
        base.model.apply_model(x, torch.tensor([0.6] * x.shape[0]), c_crossattn=ctx, attention_mask=mask,
                               num_tokens=16, transformer_options=dict(opts["transformer_options"]))
        assert seen == want


def test_another_attention_count_stops_with_a_clear_error(comfyui):
    tiny = _tiny(comfyui)
    base = tiny.build("lumina2")
    mod = comfyui.module_of("TrainFreePAG")
    first, n_main = mod.pag_lumina.layer_counts(base.model.diffusion_model)
    opts = mod.perturbed_options(base.model_options, "lumina2", [("block", 0, None)], counts=(first, n_main + 1))
    x, ctx, mask = _inputs(tiny)
    with pytest.raises(RuntimeError, match=r"the network made 4 attention calls, 5 expected \(2 refiner and 3 main"):
        base.model.apply_model(x, torch.tensor([0.6]), c_crossattn=ctx, attention_mask=mask, num_tokens=16,
                               transformer_options=dict(opts["transformer_options"]))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's inductor backend needs a C compiler on the CPU")
def test_under_torch_compile_model(comfyui):
    """The call numbering runs inside the compiled forward (core's TorchCompileModel after PAG): the sample matches
    the eager one to compiler rounding, far below PAG's effect."""
    import comfy.sample
    import torch._dynamo
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    tiny = _tiny(comfyui)
    base = tiny.build("lumina2")
    noise = torch.randn(tiny.latent_shape("lumina2", 1), generator=torch.Generator().manual_seed(4))
    pos, neg = tiny.conditioning("lumina2", 1), tiny.conditioning("lumina2", 2)

    def sample(m):
        return comfy.sample.sample(m, noise, 4, 3.0, "euler", "normal", pos, neg, torch.zeros_like(noise), seed=4,
                                   disable_pbar=True)
    guided = _pag(comfyui, base, 3.0, "block.1")
    plain, eager = sample(base), sample(guided)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = sample(TorchCompileModel.execute(guided, "inductor")[0])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs > 0                                     # the network did run compiled
    effect = float((eager - plain).abs().max())
    assert effect > 1e-2 and float((compiled - eager).abs().max()) < 1e-2 * effect
