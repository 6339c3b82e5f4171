"""The digits data set (scikit-learn's ``load_digits``: 1797 images, 8x8, 10 classes).

Convention: images are float tensors (N, 1, 8, 8) scaled to [-1, 1] (pixel / 8 - 1); labels
0..9; label 10 is the null class for classifier-free guidance. One fixed, stratified split
(seed 0) is shared by every model: 80% ``train`` (the diffusion models and the classifier
learn from it) and 20% ``held_out`` (the classifier's test set and the FD reference).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

NULL_CLASS = 10
NUM_CLASSES = 10
HELD_OUT_FRACTION = 0.2


@lru_cache(maxsize=1)
def _split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    rng = np.random.default_rng(0)
    held_out = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):  # stratified: the same fraction of every class
        members = np.flatnonzero(digits.target == digit)
        held_out[rng.choice(members, size=round(len(members) * HELD_OUT_FRACTION), replace=False)] = True
    mask = torch.from_numpy(held_out)
    return {"train": (images[~mask], labels[~mask]), "held_out": (images[mask], labels[mask])}


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 8, 8) in [-1, 1], labels (N,)) of the ``train`` or ``held_out`` split."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    images, labels = _split()[split]
    return images.clone(), labels.clone()
