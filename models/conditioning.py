"""What a sampler state's rows condition on: decided once, when a request is admitted.

A class-conditional backbone takes one class id per row. A guided state also runs each
sample a second time on the model's null class (its unconditional rows) and combines the two
outputs as u + w·(c − u) (Ho & Salimans, 2022); `Conditioning` holds both rows' inputs and w,
and is the only place that decides whether a state is guided. `step_batch` stacks the inputs
of every state in a forward, conditional rows first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TextContext:
    """Encoded prompts for a text-conditioned backbone, one row per backbone row: what its
    `forward(x, t, y)` takes as `y`."""

    tokens: Tensor  # [B, L, D] the text encoders' hidden states, padded to L
    mask: Tensor | None = None  # [B, L] bool, True for real tokens; None: every token real
    pooled: Tensor | None = None  # [B, P] pooled text embedding, for backbones that take one


@dataclass(frozen=True)
class Conditioning:
    """`inputs`: the conditional rows' model input ([n] class ids), None for an unconditional
    backbone; `null_inputs`: the unconditional rows' input, None when unguided; `scale`: the
    guidance weight w (1 when unguided)."""

    inputs: Tensor | None = None
    null_inputs: Tensor | None = None
    scale: float = 1.0

    @property
    def guided(self) -> bool:
        return self.null_inputs is not None

    @property
    def rows_per_sample(self) -> int:
        """Backbone rows per sample and evaluation: a guided sample also runs unconditionally."""
        return 2 if self.guided else 1

    @classmethod
    def classes(cls, labels: Tensor, null_label: int | None, scale: float = 1.0) -> Conditioning:
        """Rows labelled `labels` ([n] class ids), guided toward them when `scale` is not 1.
        ValueError when guidance is asked of a model without a null class."""
        if scale == 1.0:
            return cls(labels)
        if null_label is None:
            raise ValueError("guidance needs the model's null class, and it has none")
        return cls(labels, torch.full_like(labels, null_label), float(scale))

    @classmethod
    def null_class(
        cls, n: int, null_label: int, device: torch.device | str = "cpu"
    ) -> Conditioning:
        """`n` rows without a class on a class-conditional model: its null class, unguided."""
        return cls(torch.full((n,), null_label, dtype=torch.int64, device=device))


UNCONDITIONAL = Conditioning()
