"""scikit-learn's bundled handwritten digits, split once and for all into train and held-out.

The 1,797 images are 8×8 with integer values 0–16. They are served at their native size as
one channel scaled to [-1, 1] (the range every backbone and the samplers assume). The split is
a fixed rule rather than a seeded shuffle, so it cannot drift with a library version: within
each class, every fifth image (in dataset order) is held out — 364 held-out images, 1,433 for
training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HELD_OUT_EVERY = 5
CLASS_NAMES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class DigitsSplit:
    train_x: torch.Tensor  # [N, 1, 8, 8] float32 in [-1, 1]
    train_y: torch.Tensor  # [N] int64
    held_out_x: torch.Tensor
    held_out_y: torch.Tensor


def to_unit_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Dataset values 0–16 → float32 in [-1, 1]."""
    return torch.as_tensor(pixels, dtype=torch.float32) / 8.0 - 1.0


def load_digits_split() -> DigitsSplit:
    from sklearn.datasets import load_digits  # recipe/evaluation dependency only

    digits = load_digits()
    images, labels = digits.images, digits.target.astype(np.int64)
    held_out = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        held_out[np.flatnonzero(labels == c)[::HELD_OUT_EVERY]] = True
    x = to_unit_range(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    keep = torch.from_numpy(~held_out)
    return DigitsSplit(x[keep], y[keep], x[~keep], y[~keep])
