"""The digit classifier: judge of class accuracy and feature extractor of FD-digits.

A small CNN (conv 32 -> conv 64 -> pool -> conv 128 -> global average -> 64-d features ->
10 logits). ``features(x)`` is the 64-d penultimate layer. The Frechet distance between two
sets of images is that of Gaussians fitted to their features:

    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))
"""

from __future__ import annotations

import numpy as np
from torch import Tensor, nn

FEATURES = 64


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """FD between Gaussians fitted to two feature sets (rows are samples), in float64."""
    a, b = features_a.double().numpy(), features_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^(1/2)) from the eigenvalues of S_a^(1/2) S_b S_a^(1/2), symmetric PSD
    vals_a, vecs_a = np.linalg.eigh(cov_a)
    sqrt_a = (vecs_a * np.sqrt(np.clip(vals_a, 0, None))) @ vecs_a.T
    middle = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
