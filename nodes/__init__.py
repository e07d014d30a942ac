"""The only layer that imports ComfyUI: one small adapter module per method."""
from . import (adaptive_guidance, autodiffusion, cache_quant, cfg_pp, dc_solver, deep_cache, dpm_solver_v3,
               hybrid_inference, momentum, nasa, pag, time_shift)
from .sampler_support import register_dropdown_samplers

_MODULES = (momentum, time_shift, dpm_solver_v3, dc_solver, autodiffusion, adaptive_guidance, cfg_pp, pag, nasa,
            hybrid_inference, deep_cache, cache_quant)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in _MODULES:
    for _node_id, (_cls, _display) in _module.NODES.items():
        NODE_CLASS_MAPPINGS[_node_id] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_node_id] = _display

DROPDOWN_SAMPLERS = register_dropdown_samplers({k: v for m in _MODULES for k, v in m.DROPDOWN.items()})
