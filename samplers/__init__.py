"""The pack's solvers in ComfyUI's sampler signature, importable without ComfyUI.

``SAMPLERS[name](model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``
takes a denoiser ``model(x, sigma, **extra_args) -> x0`` and ComfyUI's sigma schedule and returns
the final latent, for eps / v-prediction (VE) and rectified-flow (CONST) models alike.
"""
from .common import SamplerInputError, UnsupportedModelError
from .dc_solver import sample_dc_solver
from .dpm_solver_v3 import sample_dpm_solver_v3
from .momentum import sample_dpmpp_2m_hb, sample_ghvb, sample_plms, sample_plms_hb
from .time_shift import sample_ts_ddim, sample_ts_dpmpp_2m

SAMPLERS = {
    "plms": sample_plms,
    "plms_hb": sample_plms_hb,
    "ghvb": sample_ghvb,
    "dpmpp_2m_hb": sample_dpmpp_2m_hb,
    "ts_ddim": sample_ts_ddim,
    "ts_dpmpp_2m": sample_ts_dpmpp_2m,
    "dpm_solver_v3": sample_dpm_solver_v3,
    "dc_solver": sample_dc_solver,
}

__all__ = ["SAMPLERS", "SamplerInputError", "UnsupportedModelError"]
