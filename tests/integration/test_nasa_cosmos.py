"""TrainFreeNASA on Cosmos-Predict2 and PixArt (a DIFFUSION_MODEL wrapper, around apply_model on PixArt, and an
attention override numbering each forward's calls, nodes/nasa_cosmos.py; PixArt's calls get the forward's options from
nodes/pixart_options.py; the family-independent checks: test_nasa_node.py): the U-Net formula at a block's
cross-attention, PAG's call numbering beside it in either order, clear stops where the network calls attention
otherwise."""
import pytest
import torch
from nasa_cases import nasa as _nasa
from nasa_cases import noise as _noise
from nasa_cases import pag_inside_nasa_in_either_order
from nasa_cases import sample as _sample
from nasa_cases import tiny as _tiny
from probes import perturbed_calls

ARCHS = ("cosmos_predict2", "pixart")
NAMES = {"cosmos_predict2": "Cosmos-Predict2", "pixart": "PixArt"}
IMAGE_TOKENS = {"cosmos_predict2": 16, "pixart": 400}     # 8 x 8 and 40 x 40 latents in patches of 2


def _cross_attention_inputs(model, cond, noise, block):
    """What block ``block``'s cross-attention hands its output projection, in a one-step cfg-1 sample of ``cond``."""
    seen = []
    attn = model.model.diffusion_model.blocks[block].cross_attn
    proj = getattr(attn, "output_proj", None) or attn.proj       # Cosmos / PixArt
    hook = proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    try:
        _sample(model, cond, cond, noise, steps=1)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("neg_tokens", [16, 9])
def test_the_first_cross_attention_is_the_prompts_minus_alpha_times_the_negatives(comfyui, arch, neg_tokens):
    """Before the first block's cross-attention nothing depends on the prompt (neither network has a pooled text
    vector), so there NASA's output is exactly Z+ of the prompt's own run minus alpha times Z- of the negative's own
    run (its keys and values from the block's own projections, 16 or 9 tokens; PixArt's from its caption embedder's
    per-token projection too). The second block's then differs from the prompt's (the first block was steered)."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, noise = tiny.conditioning(arch, 1), _noise(arch)
    neg = [[tiny.conditioning(arch, 2)[0][0][:, :neg_tokens], {}]]
    model = _nasa(comfyui, base, neg, 0.3)
    z_pos, z_neg = _cross_attention_inputs(base, pos, noise, 0), _cross_attention_inputs(base, neg, noise, 0)
    got = _cross_attention_inputs(model, pos, noise, 0)
    torch.testing.assert_close(got, z_pos - 0.3 * z_neg, rtol=1e-5, atol=1e-6)
    later = _cross_attention_inputs(base, pos, noise, 1)
    assert (_cross_attention_inputs(model, pos, noise, 1) - later).abs().max() > 1e-3 * later.abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_pag_numbers_the_networks_calls_beside_nasa_in_either_order(comfyui, monkeypatch, arch):
    """PAG on Cosmos and PixArt numbers the network's attention calls (two per block) and perturbs a chosen block's
    self-attention; NASA adds a negative-prompt call to every cross-attention, marked as its own. With both, in
    either order, PAG perturbs the same calls (the image tokens, one call per chosen block and forward), a vanishing
    alpha gives PAG's own result, and at alpha 0.5 both orders give the same sample."""
    nodes = comfyui.nodes.NODE_CLASS_MAPPINGS
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, neg, noise = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), _noise(arch)

    def pag(model):
        return nodes["TrainFreePAG"]().patch(model, 2.0, "block.1", 0.0, 1.0)[0]
    seen = perturbed_calls(comfyui, monkeypatch)
    pag_inside_nasa_in_either_order(comfyui, base, neg, pos, noise, pag, seen, [(IMAGE_TOKENS[arch], None)] * 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_another_call_layout_stops_with_a_clear_error(comfyui, monkeypatch, arch):
    """Were a block to make a third attention call, or the cross-attention to see other keys, the override could not
    tell the prompt's keys: the node's own error, not a silently wrong steering."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, neg, noise = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), _noise(arch)
    blocks = len(base.model.diffusion_model.blocks)
    mod = comfyui.module_of("TrainFreeNASA").nasa_cosmos
    name = "pixart_wrapper" if arch == "pixart" else "wrapper"
    real = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda neg_, alpha, window, n: real(neg_, alpha, window, n + 1))
    with pytest.raises(RuntimeError, match=rf"on {NAMES[arch]}: the network made {2 * blocks} attention calls, "
                                           rf"{2 * blocks + 2} expected"):
        _sample(_nasa(comfyui, base, neg), pos, pos, noise, steps=1)
    monkeypatch.undo()
    override = mod._override
    monkeypatch.setattr(mod, "_override", lambda earlier, state, rows, t_pos, t_neg, alpha, name_:
                        override(earlier, state, rows, t_pos, t_neg + 1, alpha, name_))   # one key fewer than counted
    with pytest.raises(RuntimeError, match=r"attention call 2 is over 21 keys where the cross-attention's 16 \+ 6 "
                                           r"prompt tokens were expected"):
        _sample(_nasa(comfyui, base, [[neg[0][0][:, :5], {}]]), pos, pos, noise, steps=1)
