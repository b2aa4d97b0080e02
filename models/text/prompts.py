"""One encoded prompt, and the stacking of several into the `TextContext` a backbone takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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

    def context(self) -> TextContext:
        """This prompt as a one-row `TextContext`."""
        pooled = None if self.pooled is None else self.pooled[None]
        return TextContext(self.tokens[None], None, pooled)

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
    return TextContext.cat([p.context() for p in prompts])
