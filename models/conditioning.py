"""What a sampler state's rows condition on: decided once, when a request is admitted.

A class-conditional backbone takes one class id per row, a text-conditioned one a row of
encoded prompt tokens (`TextContext`). A guided state also runs each sample a second time on
the model's null class, or on the negative (or empty) prompt — its unconditional rows — and
combines the two outputs as u + w·(c − u) (Ho & Salimans, 2022). `Conditioning` holds both
rows' inputs and w, and is the only place that decides whether a state is guided;
`step_batch` stacks the inputs of every state in a forward (`stack_inputs`), conditional
rows first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class TextContext:
    """Encoded prompts for a text-conditioned backbone, one row per backbone row: what its
    `forward(x, t, y)` takes as `y`."""

    tokens: Tensor  # [B, L, D] the text encoders' hidden states, padded to L
    mask: Tensor | None = None  # [B, L] bool, True for real tokens; None: every token real
    pooled: Tensor | None = None  # [B, P] pooled text embedding, for backbones that take one

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TextContext:
        """On `device`, its embeddings in `dtype` (a backbone's own; the mask stays bool)."""
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        mask = None if self.mask is None else self.mask.to(device)
        return TextContext(self.tokens.to(device, dtype), mask, pooled)

    @property
    def nbytes(self) -> int:
        """Bytes the rows take once stacked (a view counts at its full size)."""
        parts = (self.tokens, self.mask, self.pooled)
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    def repeat_rows(self, n: int) -> TextContext:
        """Every row `n` times in a row (a request's n images share its prompt); a one-row
        context becomes views, not copies."""

        def repeat(t: Tensor) -> Tensor:
            return t.expand(n, *t.shape[1:]) if self.rows == 1 else t.repeat_interleave(n, 0)

        mask = None if self.mask is None else repeat(self.mask)
        pooled = None if self.pooled is None else repeat(self.pooled)
        return TextContext(repeat(self.tokens), mask, pooled)

    @classmethod
    def cat(cls, parts: Sequence[TextContext]) -> TextContext:
        """Row-concatenate contexts of any token counts: shorter ones are zero-padded and
        masked, so a forward can mix prompts of different lengths."""
        length = max(part.tokens.shape[1] for part in parts)
        if any((part.pooled is None) != (parts[0].pooled is None) for part in parts):
            raise ValueError("pooled embeddings must be given for all contexts or for none")
        same_length = all(part.tokens.shape[1] == length for part in parts)
        tokens, masks = [], []
        for part in parts:
            missing = length - part.tokens.shape[1]
            tokens.append(F.pad(part.tokens, (0, 0, 0, missing)))
            mask = part.mask
            if mask is None:
                mask = part.tokens.new_ones(part.tokens.shape[:2], dtype=torch.bool)
            masks.append(F.pad(mask, (0, missing), value=False))
        no_mask = same_length and all(part.mask is None for part in parts)
        pooled = None
        if parts[0].pooled is not None:  # then every part's is (checked above)
            pooled = torch.cat([p.pooled for p in parts if p.pooled is not None])
        return cls(torch.cat(tokens), None if no_mask else torch.cat(masks), pooled)


class RowInputs(Protocol):
    """A backbone input other than class ids, one row per backbone row (a `TextContext`, or
    a backbone's cache derived from one): what `step_batch` stacks across states."""

    def repeat_rows(self, n: int) -> RowInputs: ...

    @property
    def nbytes(self) -> int: ...

    @classmethod
    def cat(cls, parts: Sequence[Any]) -> RowInputs: ...


ModelInput = Tensor | RowInputs  # one row per backbone row: class ids, or encoded prompts


def stack_inputs(parts: Sequence[ModelInput]) -> ModelInput:
    """Several states' model inputs as one forward's, rows in order."""
    first = parts[0]
    if isinstance(first, Tensor):
        tensors = [part for part in parts if isinstance(part, Tensor)]
        if len(tensors) != len(parts):
            raise TypeError("class ids and other model inputs do not stack into one forward")
        return torch.cat(tensors)
    return type(first).cat(parts)


def guides(scale: float) -> bool:
    """Whether a state that has an unconditional input runs it at this guidance scale: the
    one rule, for class and text conditioning alike (w = 1 leaves u + w·(c − u) = c)."""
    return scale != 1.0


@dataclass(frozen=True)
class Conditioning:
    """`inputs`: the conditional rows' model input ([n] class ids or a `TextContext` of n
    rows), None for an unconditional backbone; `null_inputs`: the unconditional rows' input
    (the null class, the negative or empty prompt), None when unguided; `scale`: the guidance
    weight w (1 when unguided)."""

    inputs: ModelInput | None = None
    null_inputs: ModelInput | None = None
    scale: float = 1.0

    @property
    def guided(self) -> bool:
        return self.null_inputs is not None

    @cached_property  # read for every request at every engine iteration
    def nbytes(self) -> int:
        """Bytes of the rows' inputs (both kinds) as a forward stacks them."""
        parts = (self.inputs, self.null_inputs)
        return sum(p.nbytes for p in parts if p is not None)

    @property
    def rows_per_sample(self) -> int:
        """Backbone rows per sample and evaluation: a guided sample also runs unconditionally."""
        return 2 if self.guided else 1

    @classmethod
    def prompts(
        cls, n: int, prompt: RowInputs, negative: RowInputs, scale: float = 1.0
    ) -> Conditioning:
        """A request's n rows from its one-row encoded prompt (a `TextContext`, or the
        backbone's cache of it), guided when `scale` is not 1: the negative (or empty) prompt
        then runs as the unconditional rows."""
        if not guides(scale):
            return cls(prompt.repeat_rows(n))
        return cls(prompt.repeat_rows(n), negative.repeat_rows(n), float(scale))

    @classmethod
    def classes(cls, labels: Tensor, null_label: int | None, scale: float = 1.0) -> Conditioning:
        """Rows labelled `labels` ([n] class ids), guided toward them when `scale` is not 1.
        ValueError when guidance is asked of a model without a null class."""
        if not guides(scale):
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
