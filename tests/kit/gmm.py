"""An exact, analytic stand-in for a diffusion model: a class-conditional Gaussian mixture.

The data distribution is a mixture of K Gaussians with diagonal covariances; each component
belongs to one class. A noised sample is ``x = alpha * x0 + s * n`` with ``n ~ N(0, I)``:

* ComfyUI's VE form (EPS / V_PREDICTION models):   alpha = 1,         s = sigma
* ComfyUI's rectified flow (CONST, SD3/Flux/Wan):  alpha = 1 - sigma, s = sigma

Every component stays Gaussian under noising, N(alpha*mu_k, alpha^2*C_k + s^2), so the posterior
mean E[x0 | x] (the ideal denoiser ComfyUI samplers call), the exact log-density of the noised
marginal and the exact classifier-free-guidance target are closed forms. Everything is float64.
"""
from __future__ import annotations

import math

import torch

KINDS = ("ve", "flow")


def coefficients(sigma: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, s) of ``x = alpha * x0 + s * n`` at ComfyUI noise level ``sigma``."""
    if kind == "ve":
        return torch.ones_like(sigma), sigma
    if kind == "flow":
        return 1.0 - sigma, sigma
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


class GaussianMixture:
    """Class-conditional Gaussian mixture with exact noised statistics.

    means, variances: (K, d); weights: (K,) summing to 1; labels: (K,) class of each component.
    """

    def __init__(self, means, variances, weights, labels):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.variances = torch.as_tensor(variances, dtype=torch.float64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.num_classes = int(self.labels.max()) + 1
        self.dim = self.means.shape[1]
        if not torch.allclose(self.weights.sum(), torch.tensor(1.0, dtype=torch.float64)):
            raise ValueError("weights must sum to 1")

    # -- component log-likelihoods ------------------------------------------------------------
    def _component_terms(self, x, alpha, s):
        """x: (B, d); alpha, s: (B,) -> (log N_k(x) (B, K), per-component posterior means (B, K, d))."""
        a = alpha[:, None, None]
        var = a**2 * self.variances[None] + (s**2)[:, None, None]            # (B, K, d)
        diff = x[:, None, :] - a * self.means[None]                           # (B, K, d)
        logn = -0.5 * ((diff**2) / var + torch.log(2 * math.pi * var)).sum(-1)
        post_mean = self.means[None] + a * self.variances[None] / var * diff  # E[x0 | x, k]
        return logn, post_mean

    def _log_prior(self, cls, batch):
        """log pi_k restricted to the class (or all components when cls is None): (B, K)."""
        logw = self.weights.log()[None].expand(batch, -1)
        if cls is None:
            return logw
        cls = torch.as_tensor(cls, dtype=torch.long).reshape(-1).expand(batch)
        mask = self.labels[None, :] == cls[:, None]
        logw = torch.where(mask, logw, torch.full_like(logw, -math.inf))
        return logw - torch.logsumexp(logw, dim=-1, keepdim=True)   # p(k | class)

    # -- exact quantities ---------------------------------------------------------------------------
    def denoise(self, x, sigma, kind="ve", cls=None):
        """E[x0 | x_sigma = x, class] for x of shape (B, ...) and sigma scalar or (B,)."""
        flat, alpha, s = self._prep(x, sigma, kind)
        logn, post_mean = self._component_terms(flat, alpha, s)
        resp = torch.softmax(self._log_prior(cls, flat.shape[0]) + logn, dim=-1)
        return (resp[..., None] * post_mean).sum(1).reshape(x.shape)

    def log_prob(self, x, sigma, kind="ve", cls=None):
        """Exact log-density of the noised marginal p_sigma(x | class): (B,)."""
        flat, alpha, s = self._prep(x, sigma, kind)
        logn, _ = self._component_terms(flat, alpha, s)
        return torch.logsumexp(self._log_prior(cls, flat.shape[0]) + logn, dim=-1)

    def class_posterior(self, x, sigma, kind="ve"):
        """p(class | x_sigma = x): (B, num_classes)."""
        flat, alpha, s = self._prep(x, sigma, kind)
        logn, _ = self._component_terms(flat, alpha, s)
        joint = self._log_prior(None, flat.shape[0]) + logn
        out = torch.full((flat.shape[0], self.num_classes), -math.inf, dtype=torch.float64)
        for c in range(self.num_classes):
            out[:, c] = torch.logsumexp(joint[:, self.labels == c], dim=-1)
        return torch.softmax(out, dim=-1)

    def cfg_denoise(self, x, sigma, cls, scale, kind="ve"):
        """Exact classifier-free-guidance target D_u + w (D_c - D_u), ComfyUI's CFG."""
        d_u = self.denoise(x, sigma, kind)
        d_c = self.denoise(x, sigma, kind, cls)
        return d_u + scale * (d_c - d_u)

    def sample(self, n, cls=None, generator=None):
        """Exact samples x0 of the data distribution (for class cls when given): (n, d)."""
        logp = self._log_prior(cls, n)
        comp = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + self.variances[comp].sqrt() * z

    # -- helpers -------------------------------------------------------------------------------------
    def _prep(self, x, sigma, kind):
        x = torch.as_tensor(x, dtype=torch.float64)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"sample has {flat.shape[1]} elements, mixture has dim {self.dim}")
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(flat.shape[0])
        alpha, s = coefficients(sigma, kind)
        return flat, alpha, s


def default_mixture(dim: int = 8, num_classes: int = 3, per_class: int = 2, seed: int = 0) -> GaussianMixture:
    """A well-separated, anisotropic mixture: a test distribution with curvature in the ODE."""
    g = torch.Generator().manual_seed(seed)
    k = num_classes * per_class
    means = 2.0 * torch.randn(k, dim, dtype=torch.float64, generator=g)
    variances = 0.02 + 0.3 * torch.rand(k, dim, dtype=torch.float64, generator=g)
    weights = 0.5 + torch.rand(k, dtype=torch.float64, generator=g)
    labels = torch.arange(k) // per_class
    return GaussianMixture(means, variances, weights / weights.sum(), labels)


def point_mass(dim: int = 8, seed: int = 0) -> GaussianMixture:
    """Data concentrated at one point: the denoiser is constant, so every consistent step is exact."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(1, dim, dtype=torch.float64, generator=g)
    return GaussianMixture(mean, torch.zeros(1, dim, dtype=torch.float64), [1.0], [0])
