"""Reference solutions of the probability-flow ODE, accurate to about 1e-10.

In ComfyUI's sigma space the PF-ODE reads dx/dsigma = (x - D(x, sigma)) / sigma for VE and for
rectified-flow models alike. With u = log(sigma) it is dx/du = x - D(x, e^u), a non-stiff system
(its Jacobian's eigenvalues lie in [0, 1] for a Gaussian mixture), integrated here with classical
RK4 on a fine uniform grid in u. An end point sigma = 0 is reached by integrating to
``SIGMA_EPS`` and applying the denoiser there: the remaining error is O(SIGMA_EPS^2 / var).
"""
from __future__ import annotations

import math

import torch

SIGMA_EPS = 1e-6


def solve(denoise, x, sigma_from: float, sigma_to: float, h: float = 5e-3):
    """Integrate the PF-ODE of ``denoise(x, sigma)`` from sigma_from down to sigma_to (float64)."""
    x = x.to(torch.float64)
    end = max(float(sigma_to), SIGMA_EPS)
    u0, u1 = math.log(float(sigma_from)), math.log(end)
    n = max(1, math.ceil(abs(u1 - u0) / h))
    step = (u1 - u0) / n

    def f(x, u):
        sigma = torch.tensor(math.exp(u), dtype=torch.float64)
        return x - denoise(x, sigma)

    u = u0
    for _ in range(n):
        k1 = f(x, u)
        k2 = f(x + 0.5 * step * k1, u + 0.5 * step)
        k3 = f(x + 0.5 * step * k2, u + 0.5 * step)
        k4 = f(x + step * k3, u + step)
        x = x + step / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        u += step
    if sigma_to == 0:
        x = denoise(x, torch.tensor(end, dtype=torch.float64))
    return x


def gaussian_flow(x, mean, var, sigma_from, sigma_to, kind="ve"):
    """Closed-form PF-ODE map for a single Gaussian N(mean, diag(var)).

    Along the ODE, (x - alpha*mean) / sqrt(alpha^2 var + s^2) is invariant for each coordinate.
    """
    def coef(sigma):
        sigma = torch.as_tensor(float(sigma), dtype=torch.float64)
        return (torch.ones_like(sigma), sigma) if kind == "ve" else (1.0 - sigma, sigma)

    a0, s0 = coef(sigma_from)
    a1, s1 = coef(sigma_to)
    z = (x - a0 * mean) / torch.sqrt(a0**2 * var + s0**2)
    return a1 * mean + torch.sqrt(a1**2 * var + s1**2) * z
