"""Sigma schedules in ComfyUI's conventions (float64) for the analytic tests."""
import torch


def sd_sigma_table(steps: int = 1000) -> torch.Tensor:
    """SD1.5's discrete sigma table (scaled-linear betas 0.00085..0.012), ascending."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, 0)
    return ((1.0 - abar) / abar) ** 0.5


def flow_sigma_table(steps: int = 1000) -> torch.Tensor:
    """A rectified-flow model's table (SD3 with shift 1): t = i/steps, ascending."""
    return torch.arange(1, steps + 1, dtype=torch.float64) / steps


def karras(n: int, sigma_min=0.0292, sigma_max=14.61, rho=7.0, zero_end=True) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]) if zero_end else s


def flow_linear(n: int, t_max=1.0, t_min=1e-3, zero_end=True) -> torch.Tensor:
    s = torch.linspace(t_max, t_min, n, dtype=torch.float64)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]) if zero_end else s


def for_kind(kind: str, n: int, zero_end=True) -> torch.Tensor:
    """A typical schedule of n steps: Karras for VE models, linear in t for flow models."""
    return karras(n, zero_end=zero_end) if kind == "ve" else flow_linear(n, zero_end=zero_end)
