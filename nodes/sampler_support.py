"""ComfyUI side of the pack's solvers: SAMPLER objects and the KSampler dropdown entries.

Every TrainFree solver is a pure function in ``samplers/`` with ComfyUI's sampler signature;
this module only wraps it in ``comfy.samplers.KSAMPLER`` (which drives ComfyUI's progress bar,
previews and Cancel through the per-step callback) and makes it selectable by name.
"""
from __future__ import annotations

import functools
import logging

import comfy.k_diffusion.sampling as k_sampling
import comfy.samplers

from ..samplers.common import check_range

CATEGORY = "trainfree/samplers"
PREFIX = "trainfree_"
log = logging.getLogger("trainfree")


class SamplerNode:
    """Common shape of the pack's SAMPLER nodes (V1 schema: stable across ComfyUI releases)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"


def _no_steps_is_a_no_op(function):
    """A one-value SIGMAS (e.g. SplitSigmas at the last step) has no step to take: return the latent, as every
    ComfyUI sampler does, instead of the solvers' 'at least 2 values' error."""
    @functools.wraps(function)
    def sampler(model, x, sigmas, *args, **kwargs):
        if sigmas.numel() < 2:
            return x
        return function(model, x, sigmas, *args, **kwargs)
    return sampler


def ksampler(function, **options):
    """A SAMPLER value for SamplerCustomAdvanced / SamplerCustom."""
    return comfy.samplers.KSAMPLER(_no_steps_is_a_no_op(function), extra_options=options)


def checked(**ranges):
    """Validate node inputs with the solvers' own ranges: (value, lo, hi) per name."""
    for name, (value, lo, hi) in ranges.items():
        check_range(name, value, lo, hi)


def _marked(function, attr):
    sampler = _no_steps_is_a_no_op(function)
    sampler.__trainfree__ = True
    sampler.__name__ = sampler.__qualname__ = attr      # its own name (Schedule Search keys its cache by it)
    return sampler


def register_dropdown_samplers(entries: dict) -> list[str]:
    """Make ``PREFIX + name`` selectable in KSampler / KSamplerSelect (paper defaults).

    ComfyUI looks a sampler name up as ``comfy.k_diffusion.sampling.sample_<name>``; we add new
    attributes there and publish extended *copies* of its name lists, so ComfyUI's own entries and
    list objects are never rewritten. Re-registration (a reload) is harmless.
    """
    added = []
    for name, function in entries.items():
        full = PREFIX + name
        attr = "sample_" + full
        current = getattr(k_sampling, attr, None)
        if current is not None and not getattr(current, "__trainfree__", False):
            log.warning("trainfree: %s already exists (%s); not replacing it", attr, current)
            continue
        setattr(k_sampling, attr, _marked(function, attr))
        added.append(full)
    names = list(comfy.samplers.SAMPLER_NAMES)
    names += [n for n in added if n not in names]
    comfy.samplers.SAMPLER_NAMES = names
    comfy.samplers.KSampler.SAMPLERS = names
    return added
