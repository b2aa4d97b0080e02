"""One encoded prompt, and the stacking of several into the `TextContext` a backbone takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from denoised.models.conditioning import TextContext


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's text-encoder output and what its tokenizer made of it.

    `num_tokens` counts the prompt's tokens before truncation, special tokens included (the
    tokenizer limit counts them too); `truncated` is True when that exceeds the limit, i.e.
    some of the prompt reached no encoder."""

    tokens: Tensor  # [L, D]
    pooled: Tensor | None  # [P], for backbones that take a pooled embedding
    num_tokens: int
    truncated: bool

    @property
    def nbytes(self) -> int:
        pooled = 0 if self.pooled is None else self.pooled.nbytes
        return self.tokens.nbytes + pooled


def stack_prompts(prompts: Sequence[EncodedPrompt]) -> TextContext:
    """One `TextContext` row per prompt. Prompts of different lengths are padded with zeros to
    the longest, and `mask` marks the real tokens; `mask` is None when all have one length.
    ValueError for no prompts, or when some have a pooled embedding and others not."""
    if not prompts:
        raise ValueError("no prompts to stack")
    pooled = [p.pooled for p in prompts]
    if any(x is None for x in pooled) and any(x is not None for x in pooled):
        raise ValueError("some prompts have a pooled embedding and some do not")
    lengths = [p.tokens.shape[0] for p in prompts]
    if len(set(lengths)) == 1:
        tokens, mask = torch.stack([p.tokens for p in prompts]), None
    else:
        first = prompts[0].tokens
        tokens = first.new_zeros(len(prompts), max(lengths), first.shape[1])
        mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=first.device)
        for row, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            tokens[row, :n] = p.tokens
            mask[row, :n] = True
    return TextContext(
        tokens=tokens,
        mask=mask,
        pooled=None if pooled[0] is None else torch.stack(pooled),
    )
