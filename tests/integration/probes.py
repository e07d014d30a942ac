"""Probes the integration tests put on a model to see what ComfyUI really ran."""


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
