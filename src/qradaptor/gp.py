"""A small Gaussian process and expected improvement, for the Bayesian refinement of the search.

Plans are encoded as vectors in [0, 1] (each layer's bit rung and rank rung). With a handful of
expensive observations a squared-exponential kernel with one length scale and a noise term, both chosen
by maximising the marginal likelihood over a grid, is all the model the refinement needs.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm


class GaussianProcess:
    def __init__(self, lengthscales=(0.1, 0.2, 0.4, 0.8, 1.6, 3.2), noises=(1e-4, 1e-3, 1e-2, 1e-1)):
        self.lengthscales = lengthscales
        self.noises = noises

    def _kernel(self, a: np.ndarray, b: np.ndarray, lengthscale: float) -> np.ndarray:
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / a.shape[1]  # mean squared difference per dim
        return np.exp(-0.5 * d2 / lengthscale**2)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "GaussianProcess":
        self.x = np.asarray(x, float)
        y = np.asarray(y, float)
        self.mean, self.scale = float(y.mean()), float(y.std() or 1.0)
        self.y = (y - self.mean) / self.scale
        best = None
        for ls in self.lengthscales:
            k = self._kernel(self.x, self.x, ls)
            for noise in self.noises:
                try:
                    chol = np.linalg.cholesky(k + noise * np.eye(len(self.x)))
                except np.linalg.LinAlgError:
                    continue
                alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, self.y))
                nll = 0.5 * self.y @ alpha + np.log(np.diag(chol)).sum()
                if best is None or nll < best[0]:
                    best = (nll, ls, noise, chol, alpha)
        _, self.lengthscale, self.noise, self.chol, self.alpha = best
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation, in the units of the fitted ``y``."""
        ks = self._kernel(np.asarray(x, float), self.x, self.lengthscale)
        mu = ks @ self.alpha
        v = np.linalg.solve(self.chol, ks.T)
        var = np.clip(1.0 - (v**2).sum(0), 1e-12, None)
        return mu * self.scale + self.mean, np.sqrt(var) * self.scale


def expected_improvement(mu: np.ndarray, sigma: np.ndarray, best: float) -> np.ndarray:
    """EI for minimisation."""
    sigma = np.maximum(sigma, 1e-12)
    z = (best - mu) / sigma
    return (best - mu) * norm.cdf(z) + sigma * norm.pdf(z)


__all__ = ["GaussianProcess", "expected_improvement"]
