"""Stacking encoded prompts into a TextContext, and the prompt-embedding cache."""

import pytest
import torch

from denoised.models.text.cache import PromptCache
from denoised.models.text.prompts import EncodedPrompt, stack_prompts


def prompt(length: int, seed: int, pooled: bool = True) -> EncodedPrompt:
    g = torch.Generator().manual_seed(seed)
    return EncodedPrompt(
        tokens=torch.randn(length, 6, generator=g),
        pooled=torch.randn(4, generator=g) if pooled else None,
        num_tokens=length,
        truncated=False,
    )


def test_stacking_pads_and_masks_different_lengths():
    a, b, c = prompt(3, 0), prompt(5, 1), prompt(1, 2)
    context = stack_prompts([a, b, c])
    assert context.tokens.shape == (3, 5, 6)
    assert context.mask.tolist() == [
        [True, True, True, False, False],
        [True] * 5,
        [True, False, False, False, False],
    ]
    for row, p in enumerate((a, b, c)):
        n = p.tokens.shape[0]
        assert torch.equal(context.tokens[row, :n], p.tokens)
        assert (context.tokens[row, n:] == 0).all()
    assert torch.equal(context.pooled, torch.stack([a.pooled, b.pooled, c.pooled]))


def test_stacking_equal_lengths_has_no_mask():
    a, b = prompt(4, 0, pooled=False), prompt(4, 1, pooled=False)
    context = stack_prompts([a, b])
    assert context.mask is None and context.pooled is None
    assert torch.equal(context.tokens, torch.stack([a.tokens, b.tokens]))


def test_stacking_refuses_mixed_pooled_and_nothing():
    with pytest.raises(ValueError, match="pooled"):
        stack_prompts([prompt(2, 0), prompt(2, 1, pooled=False)])
    with pytest.raises(ValueError, match="no prompts"):
        stack_prompts([])


def test_cache_counts_and_evicts_the_least_recently_used():
    a, b, c = prompt(3, 0), prompt(3, 1), prompt(3, 2)
    cache = PromptCache(max_bytes=2 * a.nbytes)
    assert cache.get("a") is None
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # "a" is now the most recent
    cache.put("c", c)  # over the bound: "b" goes
    assert cache.get("b") is None
    assert cache.get("c") is c
    assert (cache.hits, cache.misses, len(cache), cache.nbytes) == (2, 2, 2, 2 * a.nbytes)
    cache.put("c", b)  # replacing an entry keeps the byte count right
    assert (len(cache), cache.nbytes) == (2, 2 * a.nbytes)
    cache.put("big", prompt(30, 3))  # larger than the whole bound: not kept, nothing dropped
    assert (len(cache), cache.get("big")) == (2, None)


class CountingTokenizer:
    """Stands in for a tokenizer in `TextConditioner.encode`: one token per character."""

    def __call__(self, prompts):
        return type("Encoding", (), {"input_ids": [[0] * len(p) for p in prompts]})


def test_encode_encodes_each_distinct_prompt_once():
    from denoised.models.text.conditioner import TextConditioner

    batches = []

    class Fake(TextConditioner):
        def _encode(self, prompts):
            assert torch.is_inference_mode_enabled()
            batches.append(prompts)
            tokens = torch.stack([torch.full((2, 3), float(len(p))) for p in prompts])
            return tokens, None

    ours = Fake(torch.device("cpu"), torch.float32, CountingTokenizer(), max_tokens=4)
    cache = PromptCache(max_bytes=1 << 20)
    first = ours.encode(["ab", "abcde", "ab"], cache)
    assert batches == [["ab", "abcde"]]  # one encoder call, each distinct prompt once
    assert first[0] is first[2]
    assert [(e.num_tokens, e.truncated) for e in first] == [(2, False), (5, True), (2, False)]
    second = ours.encode(["abc", "ab"], cache)
    assert batches[1:] == [["abc"]]
    assert second[1] is first[0]
    assert (cache.hits, cache.misses) == (1, 3)
