"""Adaptive Guidance as a MODEL patch: works from plain KSampler and SamplerCustomAdvanced alike."""
from __future__ import annotations

import logging

import comfy.conds
import comfy.model_patcher
import comfy.patcher_extension as pe
import comfy.samplers
import torch

from ..guidance.adaptive_guidance import AdaptiveGuidance
from .cond_layout import other_guider, other_guider_text
from .linear_ag import NODES as LINEAR_AG_NODES
from .ui_support import report_run, ui_text

KEY = "trainfree_adaptive_guidance"
PAPER = "Castillo et al., Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models (AAAI 2025)"
log = logging.getLogger("trainfree")


class _Holder:
    def __init__(self, threshold, node_id=None):
        self.threshold, self.state, self.node_id = threshold, None, node_id
        self.other = 0              # prompts per step of a guider other than CFG's pair (passed through)


class _Rows:
    """A model cond that yields only some batch rows: processed for the whole batch, then sliced, so
    each row gets exactly the conditioning (its own prompt) it gets in a full-batch evaluation."""

    def __init__(self, inner, rows, batch):
        self.inner, self.rows, self.batch = inner, rows, batch

    def process_cond(self, batch_size, **kwargs):
        full = self.inner.process_cond(batch_size=self.batch, **kwargs)
        if isinstance(full, comfy.conds.CONDConstant):                # not per row
            return full
        c = full.cond
        if isinstance(c, torch.Tensor) and c.ndim and c.shape[0] == self.batch:
            return full._copy_with(c[self.rows])
        if isinstance(c, list) and all(isinstance(t, torch.Tensor) and t.shape[0] == self.batch for t in c):
            return full._copy_with([t[self.rows] for t in c])
        return full                                                   # constants (CONDConstant, ...)


def rows_of(conds, rows, batch):
    """``conds`` (one conditioning's list of cond dicts) restricted to batch ``rows``; None where a cond
    carries something that cannot be sliced safely (ControlNet, GLIGEN, hooks, a per-row mask)."""
    out = []
    for c in conds:
        if any(c.get(k) is not None for k in ("control", "gligen", "hooks")):
            return None
        c2 = dict(c)
        c2["model_conds"] = {k: _Rows(v, rows, batch) for k, v in c["model_conds"].items()}
        if c.get("mask") is not None:
            m = c["mask"]
            if m.shape[0] == batch:
                c2["mask"] = m[rows]
            elif m.shape[0] != 1:
                return None
        out.append(c2)
    return out


def _calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    holder = model_options["transformer_options"].get(KEY)
    if holder is None or other_guider(holder, conds) or len(conds) < 2 or conds[1] is None:   # no CFG pass
        return executor(model, conds, x_in, timestep, model_options)
    state = holder.state
    if state is None or state.guided.numel() != x_in.shape[0]:
        state = holder.state = AdaptiveGuidance(holder.threshold, x_in.shape[0], device=x_in.device)
    batch = x_in.shape[0]
    guided = state.guided.to(x_in.device)
    n = int(guided.sum())
    if n == batch:                                                    # every row guided: plain CFG pass
        out = executor(model, conds, x_in, timestep, model_options)
        state.count(batch, batch)
        return [out[0], state.select(x_in, out[0], out[1])] + list(out[2:])
    rows = guided.nonzero().flatten()
    uncond = rows_of(conds[1], rows, batch) if n else None
    if n and uncond is None:                                          # cannot slice: evaluate the whole batch
        out = executor(model, conds, x_in, timestep, model_options)
        state.count(batch, batch)
        return [out[0], state.select(x_in, out[0], out[1])] + list(out[2:])
    out = executor(model, [conds[0], None] + list(conds[2:]), x_in, timestep, model_options)
    d_u = out[0].clone()
    if n:                                                             # uncond only for the still-guided rows
        t = timestep[rows] if timestep.ndim and timestep.shape[0] == batch else timestep
        d_u[rows] = executor(model, [uncond], x_in[rows], t, model_options)[0]
    state.count(n, batch)
    return [out[0], state.select(x_in, out[0], d_u)] + list(out[2:])


def _outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    proto = original["transformer_options"][KEY]
    holder = _Holder(proto.threshold, proto.node_id)                           # fresh per run
    guider.model_options["transformer_options"][KEY] = holder
    finished = False
    try:
        out = executor(*args, **kwargs)
        finished = True
        return out
    finally:
        state = holder.state
        if holder.other and finished and not (state is not None and state.total):
            report_run(other_guider_text("Adaptive Guidance", holder), holder.node_id)
        elif state is not None and state.total:
            cut = "" if finished else " [run interrupted]"
            log.info("trainfree: Adaptive Guidance skipped %d of %d unconditional evaluations (%.0f%%)%s",
                     state.saved, state.total, 100.0 * state.saved / state.total, cut)
            ui_text(f"Adaptive Guidance: skipped {state.saved} of {state.total} negative-prompt evaluations "
                    f"({100.0 * state.saved / state.total:.0f}%){cut}", holder.node_id)
        elif finished:                       # not after a cancelled or failed run
            log.info("trainfree: Adaptive Guidance inactive: this run made no negative-prompt evaluations (CFG 1)")
            ui_text("Adaptive Guidance: inactive (CFG 1 has no negative-prompt pass to skip)", holder.node_id)
        guider.model_options = original


class TrainFreeAdaptiveGuidance:
    DESCRIPTION = ("Adaptive Guidance: once the conditional and unconditional predictions of a sample agree "
                   "(cosine similarity above the threshold), CFG is switched off for it and the unconditional "
                   "branch is no longer evaluated for it (per batch item: the other prompts keep theirs), saving up to "
                   f"half of the remaining model calls. Logs how many evaluations were saved. From {PAPER}.")
    CATEGORY = "trainfree/guidance"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with Adaptive Guidance; use it with CFG > 1.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch (chains with other patches)."}),
            "threshold": ("FLOAT", {"default": 0.9999, "min": 0.0, "max": 1.0, "step": 0.0001,
                                    "tooltip": "Agreement (cosine similarity) at which guidance stops. Model-"
                                               "dependent: the paper used 0.991-0.996 on SD; 0.9999 holds on the "
                                               "test models. Lower saves more; 1 = plain CFG."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def patch(self, model, threshold, unique_id=None):
        m = model.clone()
        m.model_options["transformer_options"][KEY] = _Holder(float(threshold), unique_id)
        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, _outer_sample)
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, KEY, _calc_cond_batch)
        return (m,)


class TrainFreeAdaptiveGuidanceGuider:
    DESCRIPTION = ("Adaptive Guidance as a GUIDER for SamplerCustomAdvanced: CFG whose unconditional branch stops "
                   "once it agrees with the conditional one (the same mechanism as the MODEL patch node). "
                   f"From {PAPER}.")
    CATEGORY = "trainfree/guidance"
    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("A CFG guider with Adaptive Guidance.",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        inputs = TrainFreeAdaptiveGuidance.INPUT_TYPES()["required"]
        return {"required": {
            "model": inputs["model"],
            "positive": ("CONDITIONING", {"tooltip": "The prompt."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (its evaluations are the ones saved)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale while guidance is on."}),
            "threshold": inputs["threshold"],
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def get_guider(self, model, positive, negative, cfg, threshold, unique_id=None):
        guider = comfy.samplers.CFGGuider(TrainFreeAdaptiveGuidance().patch(model, threshold, unique_id)[0])
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return (guider,)


NODES = {
    "TrainFreeAdaptiveGuidance": (TrainFreeAdaptiveGuidance, "Adaptive Guidance (TrainFree)"),
    "TrainFreeAdaptiveGuidanceGuider": (TrainFreeAdaptiveGuidanceGuider, "Adaptive Guidance Guider (TrainFree)"),
    **LINEAR_AG_NODES,      # LinearAG (same paper) lives in linear_ag.py
}
DROPDOWN = {}
