"""Probes the integration tests put on a model to see what ComfyUI really ran."""
import logging
import re


def count_rows(model):
    """A clone of ``model`` that records the batch rows of every diffusion-model call (APPLY_MODEL wrapper)."""
    import comfy.patcher_extension as pe

    rows = []

    def count(executor, x, *args, **kwargs):
        rows.append(x.shape[0])
        return executor(x, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "count_rows", count)
    return m, rows


def first_block_streams(model, block=0):
    """A clone of ``model`` that records the output streams (img, txt) of its DiT double block ``block`` (after any
    patch already there) at every call: (clone, records)."""
    seen = []
    m = model.clone()
    prev = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {}).get(("double_block", block))

    def spy(args, extra):
        out = prev(args, extra) if prev is not None else extra["original_block"](args)
        seen.append({k: out[k].clone() for k in ("img", "txt")})
        return out
    m.set_model_patch_replace(spy, "dit", "double_block", block)
    return m, seen


def run_logged(comfyui, prompt, caplog):
    """Run an API prompt ending in TrainFreeTestLatentStats ("stats"): (its stats, the pack's log lines). Fails on an
    error or a non-finite latent."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ok, outputs, err = comfyui.run(prompt)
    assert ok, err
    stats = outputs["stats"]
    assert "finite=True" in stats["text"][0]
    return stats, [r.getMessage() for r in caplog.records if "trainfree" in r.getMessage()]


def last_count(pattern, log):
    """The number captured by ``pattern`` in the last matching log line (a node's report); fails when none matches."""
    found = [int(m.group(1)) for m in (re.search(pattern, line) for line in log) if m]
    assert found, log
    return found[-1]


def perturbed_calls(comfyui, monkeypatch, arch=None):
    """Record (call length, image rows) of every attention call PAG perturbs through its call numbering (HiDream,
    Cosmos-Predict2, OmniGen2; ``arch`` "lumina2": Lumina 2's, which calls the masked identity attention directly);
    the list fills as the model runs."""
    pag_math = comfyui.module_of("TrainFreePAG").pag_counted.pag_math
    seen = []
    if arch == "lumina2":
        real_identity = pag_math.joint_identity_attention

        def spy_identity(q, k, v, start, end, mask=None, **kw):
            seen.append((q.shape[2], (start, end)))
            return real_identity(q, k, v, start, end, mask=mask, **kw)
        monkeypatch.setattr(pag_math, "joint_identity_attention", spy_identity)
        return seen
    real = pag_math.perturbed_call

    def spy(img_range, *a, **kw):
        n = a[0].shape[-2] if kw.get("skip_reshape") else a[0].shape[1]
        seen.append((n, img_range(n)))
        return real(img_range, *a, **kw)
    monkeypatch.setattr(pag_math, "perturbed_call", spy)
    return seen
