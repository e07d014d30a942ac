"""Faults the integration tests inject into a running prompt, where they reach the pack in a real server.

``cancel_at``: the Cancel button. ComfyUI's server installs a progress-bar hook (main.hijack_progress) that
raises InterruptProcessingException once ``interrupt_current_processing`` was called; every sampler step and
every calibration tick passes through it. ``fail_at_linear``: an error deep inside a model evaluation (an
imitated CUDA out-of-memory error at the n-th linear layer call of a node), the way a real OOM interrupts
a forward half-way; ComfyUI answers it by unloading all models. Both count only while node ``node_id`` runs.
"""
from __future__ import annotations

import contextlib

import torch


def _running_node():
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    return None if context is None else context.node_id


@contextlib.contextmanager
def cancel_at(node_id: str, tick: int | None):
    """Cancel at the ``tick``-th progress update of node ``node_id`` (None: only count them in ``seen["ticks"]``)."""
    import comfy.model_management as mm
    import comfy.utils

    seen = {"ticks": 0}

    def hook(value, total, preview, prompt_id=None, node_id=None):
        if _running_node() == target:
            seen["ticks"] += 1
            if seen["ticks"] == tick:
                mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    target, old = node_id, comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield seen
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)


@contextlib.contextmanager
def fail_at_linear(node_id: str, call: int | None):
    """Raise torch.cuda.OutOfMemoryError at the ``call``-th linear layer call made while node ``node_id`` runs
    (None: only count them in ``seen["calls"]``)."""
    functional = torch.nn.functional
    original, seen = functional.linear, {"calls": 0}

    def linear(*args, **kwargs):
        if _running_node() == node_id:
            seen["calls"] += 1
            if seen["calls"] == call:
                raise torch.cuda.OutOfMemoryError("imitated out-of-memory error in the middle of a forward")
        return original(*args, **kwargs)

    functional.linear = linear
    try:
        yield seen
    finally:
        functional.linear = original
