"""Memory held after a run: per-run state, device copies, and whether ComfyUI can free the model.

ComfyUI frees a model by reference counting when a later prompt drops the outputs that hold it (its
executor's cache, ``clean_unused``); a reference cycle through a patch keeps the whole model (and its
LoadedModel entry, so its VRAM too) until a full garbage collection. Core's own nodes free at once,
and so must the pack's: these tests run with the collector off to see what reference counting frees.
"""
import contextlib
import gc
import uuid
import weakref

import pytest
import torch

from prompts import ksampler, patched_ksampler
from test_nodes.tiny_models import side

OTHER_CKPT_SEED = 777           # a checkpoint no other test prompt uses: a model of its own


def retained_bytes(model_patcher, inputs=()):
    """Bytes of the tensors reachable from ``model_patcher``'s options, wrappers and object patches (where the
    pack's patches and their state live), not entering torch modules (model weights) and not counting ``inputs``
    (node inputs a patch keeps on purpose, e.g. a conditioning)."""
    keep = {t.untyped_storage().data_ptr() for t in inputs}
    roots = [model_patcher.model_options, model_patcher.wrappers, model_patcher.object_patches]
    seen, found, stack = set(), {}, list(roots)
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, (torch.nn.Module, type)) or (isinstance(o, dict) and "__builtins__" in o):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            if s.data_ptr() not in keep:
                found[s.data_ptr()] = s.nbytes()
            continue
        stack.extend(gc.get_referents(o))
    return sum(found.values())


def _fresh_model_freed_without_gc(comfyui, prompt):
    """Run ``prompt`` (its checkpoint seeded OTHER_CKPT_SEED), then another prompt, with the collector off;
    True when the first prompt's model died by reference counting alone."""
    import comfy.model_management as mm

    prompt["ckpt"]["inputs"]["seed"] = OTHER_CKPT_SEED
    other = ksampler("euler", steps=1)
    comfyui.executor.reset()
    gc.collect()
    gc.disable()
    try:
        ok, _, err = comfyui.run(prompt)
        assert ok, err
        ref = weakref.ref(comfyui.executor.caches.outputs.get("ckpt")[0][0].model)
        ok, _, err = comfyui.run(other)      # drops the first prompt's outputs, as ComfyUI does between prompts
        assert ok, err
        mm.unload_all_models()
        return ref() is None
    finally:
        gc.enable()
        gc.collect()


PATCHES = {
    "core FreeU (control)": ("sd15", [("FreeU", {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2})]),
    "core PAG (control)": ("sd15", [("PerturbedAttentionGuidance", {"scale": 2.0})]),
    "PAG unet": ("sd15", [("TrainFreePAG", {"scale": 2.0, "layers": "", "start_percent": 0.0, "end_percent": 1.0})]),
    "PAG flux": ("flux", [("TrainFreePAG", {"scale": 2.0, "layers": "double.0, single.1", "start_percent": 0.0,
                                            "end_percent": 1.0})]),
    "PAG hidream": ("hidream", [("TrainFreePAG", {"scale": 2.0, "layers": "double.0, single.0", "start_percent": 0.0,
                                                  "end_percent": 1.0})]),     # attention calls numbered per forward
    "DiT cache auraflow": ("auraflow", [("TrainFreeDiTCache", {"interval": 3, "head_blocks": 1, "tail_blocks": 1})]),
    "DiT cache lumina2": ("lumina2", [("TrainFreeDiTCache", {"interval": 3, "head_blocks": 1, "tail_blocks": 0})]),
    "DiT cache omnigen2": ("omnigen2", [("TrainFreeDiTCache", {"interval": 3, "head_blocks": 1, "tail_blocks": 0})]),
    "DiT cache wan_vace": ("wan_vace", [("TrainFreeDiTCache", {"interval": 3, "head_blocks": 0, "tail_blocks": 0})]),
    "DiT cache hidream": ("hidream", [("TrainFreeDiTCache", {"interval": 3, "head_blocks": 0, "tail_blocks": 0})]),
    "DiT cache cosmos": ("cosmos_predict2", [("TrainFreeDiTCache", {"interval": 3, "head_blocks": 1,
                                                                    "tail_blocks": 0})]),
    "PixArt": ("pixart", [("TrainFreeNASA", {"negative": ["neg", 0], "alpha": 0.5, "start_percent": 0.0,  # the
                                             "end_percent": 1.0}),
                          ("TrainFreePAG", {"scale": 2.0, "layers": "block.1", "start_percent": 0.0,   # options the
                                            "end_percent": 1.0}),                                       # pack hands
                          ("TrainFreeDiTCache", {"interval": 3, "head_blocks": 0, "tail_blocks": 1})]),  # its calls
    "NASA": ("sd15", [("TrainFreeNASA", {"negative": ["neg", 0], "alpha": 0.1, "start_percent": 0.0,
                                        "end_percent": 1.0})]),
    "DeepCache": ("sd15", [("TrainFreeDeepCache", {"cache_interval": 3, "cache_depth": 1, "schedule": "uniform",
                                                   "start_percent": 0.0, "end_percent": 1.0})]),
    "DiT cache": ("flux", [("TrainFreeDiTCache", {"interval": 3, "head_blocks": 1, "tail_blocks": 1})]),
    "Adaptive Guidance": ("sd15", [("TrainFreeAdaptiveGuidance", {"threshold": 0.9})]),
}


@pytest.mark.parametrize("name", list(PATCHES))
def test_model_is_freed_by_reference_counting_once_a_later_prompt_drops_it(comfyui, name):
    arch, chain = PATCHES[name]
    assert _fresh_model_freed_without_gc(comfyui, patched_ksampler(chain, arch=arch, steps=4))


def test_the_control_frees_its_model_too(comfyui):
    """The plain graph, no patch: what ComfyUI itself does in this setup."""
    assert _fresh_model_freed_without_gc(comfyui, ksampler("euler", steps=4))


def _tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


@contextlib.contextmanager
def failing(model, at=3):
    """The ``at``-th diffusion-model call raises at its last layer, after every block (and every patch) ran:
    an error mid-sampling, inside the forward."""
    calls = [0]

    def fail(module, args):
        calls[0] += 1
        if calls[0] == at:
            raise RuntimeError("injected failure mid-sampling")

    dm = model.get_model_object("diffusion_model")
    last = getattr(dm, "final_layer", None) or list(dm.children())[-1]    # HiDream registers its final layer early
    handle = last.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            yield
    finally:
        handle.remove()


def _sample(model, arch, cond, neg, steps=4, size=8, seed=0):
    import comfy.sample

    size = side(arch, size)
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, size, size))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "normal", cond, neg, latent, seed=seed,
                               disable_pbar=True)


@pytest.mark.parametrize("arch", ["sd15", "flux", "sd3", "wan", "hunyuan_video", "hidream", "cosmos_predict2",
                                  "lumina2", "omnigen2", "pixart"])
def test_nasa_keeps_no_device_copy_of_the_negative_after_the_run(comfyui, arch):
    """The negative is cast to the model's device and dtype for a run; that copy (VRAM on a GPU, where ComfyUI's
    own unloading never reaches it) is dropped when the run ends, or fails. A float64 negative makes the cast a real copy on
    the CPU too (HiDream: its Llama features as well). The result is the same for every run."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    (t, extra), = tiny.conditioning(arch, seed=2)
    neg = [[t.double(), {k: v.double() for k, v in extra.items() if k == "conditioning_llama3"}]]
    inputs = [neg[0][0], *neg[0][1].values()]
    m = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeNASA"]().patch(base, neg, 0.3)[0]
    first = _sample(m, arch, tiny.conditioning(arch, seed=1), tiny.conditioning(arch, seed=2))
    assert retained_bytes(m, inputs=inputs) == 0
    again = _sample(m, arch, tiny.conditioning(arch, seed=1), tiny.conditioning(arch, seed=2))
    assert torch.equal(first, again)
    assert retained_bytes(m, inputs=inputs) == 0
    with failing(m):
        _sample(m, arch, tiny.conditioning(arch, seed=1), tiny.conditioning(arch, seed=2))
    assert retained_bytes(m, inputs=inputs) == 0


@pytest.mark.parametrize("name", [n for n in PATCHES if "control" not in n])
def test_patches_hold_no_tensors_after_a_run(comfyui, name):
    """After a finished run, and after one that failed mid-sampling, the pack's patches on the sampled model hold
    no per-run tensor (caches, features, recorded predictions), and rerunning gives the same latent."""
    arch, chain = PATCHES[name]
    tiny = _tiny(comfyui)
    m = tiny.build(arch)
    cond, neg = tiny.conditioning(arch, seed=1), tiny.conditioning(arch, seed=2)
    for node, inputs in chain:      # NASA's negative: the graph's link to the negative prompt
        inputs = {k: neg if v == ["neg", 0] else v for k, v in inputs.items()}
        m = getattr(comfyui.nodes.NODE_CLASS_MAPPINGS[node](), comfyui.nodes.NODE_CLASS_MAPPINGS[node].FUNCTION)(
            m, **inputs)[0]
    import comfy.sample

    def run():
        latent = comfy.sample.fix_empty_latent_channels(m, torch.zeros(2, 4, tiny.side(arch, 8), tiny.side(arch, 8)))
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
        return comfy.sample.sample(m, noise, 6, 4.0, "euler", "normal", cond, neg, latent, seed=3, disable_pbar=True)

    kept = [neg[0][0]] if any(node == "TrainFreeNASA" for node, _ in chain) else []   # NASA's input, on purpose
    first = run()
    assert retained_bytes(m, kept) == 0
    with failing(m):
        run()
    assert retained_bytes(m, kept) == 0
    assert torch.equal(run(), first)
    assert retained_bytes(m, kept) == 0


def test_model_fingerprints_are_a_bounded_cache(comfyui):
    """One fingerprint per (model, weight patches) is remembered: at most 64 strings, however many models and
    LoRA combinations a long session sees; an evicted one is computed again, the same."""
    support = comfyui.module_of("TrainFreeDiTCache").__dict__["model_fingerprint"].__globals__
    base = _tiny(comfyui).build("sd15")
    want = support["model_fingerprint"](base)
    for _ in range(100):
        m = base.clone()
        m.patches_uuid = uuid.uuid4()         # what adding a LoRA does: another key
        assert support["model_fingerprint"](m) == want
    assert len(support["_PRINTS"]) <= 64
    assert support["model_fingerprint"](base) == want


def _live_tensor_bytes():
    gc.collect()
    found = {}
    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor) and o.device.type != "meta":    # type(): no proxy __class__ lookups
            try:
                s = o.untyped_storage()
                found[s.data_ptr()] = s.nbytes()
            except RuntimeError:      # a compiler's fake tensor (left by a torch.compile test): no real memory
                pass
    return sum(found.values())


STACKS = {
    "sd15": [("TrainFreeAdaptiveGuidance", {"threshold": 0.9}), PATCHES["PAG unet"][1][0],
             PATCHES["NASA"][1][0], PATCHES["DeepCache"][1][0]],
    "flux": [("TrainFreeAdaptiveGuidance", {"threshold": 0.9}), PATCHES["PAG flux"][1][0],
             PATCHES["NASA"][1][0], PATCHES["DiT cache"][1][0]],
}


@pytest.mark.parametrize("arch", list(STACKS))
def test_repeated_runs_do_not_grow_memory(comfyui, arch):
    """Five queued runs of a stacked graph, other seeds and resolutions each time: the memory alive after a run
    (the executor's cached outputs included) is the same as after the last run of that resolution."""
    comfyui.executor.reset()
    sizes = []
    for i in range(5):
        p = patched_ksampler(STACKS[arch], arch=arch, steps=5, seed=i, size=64 if i % 2 == 0 else 80, batch=2)
        ok, _, err = comfyui.run(p)
        assert ok, err
        sizes.append(_live_tensor_bytes())
    assert sizes[2] == sizes[0] and sizes[4] == sizes[2] and sizes[3] == sizes[1], sizes
