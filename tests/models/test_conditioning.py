"""Conditioning: text contexts of different lengths share a forward (padded and masked), and a
mixed batch of text states — guided and unguided, with negative prompts — gives each state
what it gets alone."""

from __future__ import annotations

import pytest
import torch

from denoised.models.conditioning import Conditioning, TextContext, stack_inputs
from denoised.models.sampling.process import FlowProcess
from denoised.models.sampling.samplers import create_sampler, sample, step_batch

DIM = 6


def context(length: int, seed: int, pooled: bool = True) -> TextContext:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, length, DIM, generator=g)
    return TextContext(tokens, None, torch.randn(1, 3, generator=g) if pooled else None)


def text_model(x: torch.Tensor, t: torch.Tensor, y: TextContext) -> torch.Tensor:
    """A toy backbone whose output depends on every real token and the pooled vector, and
    would change if padding leaked in (padded tokens are zeros, so they lower a plain mean)."""
    mask = torch.ones(y.tokens.shape[:2], dtype=torch.bool) if y.mask is None else y.mask
    weights = mask.float().unsqueeze(-1)
    mean = (y.tokens * weights).sum(1) / weights.sum(1)
    bias = mean[:, : x.shape[1]] + y.pooled[:, :1]
    return 0.7 * x + bias[:, :, None, None] * (1 + t[:, None, None, None] / 1000)


def test_cat_pads_and_masks_shorter_contexts() -> None:
    a, b = context(3, 0), context(5, 1)
    both = TextContext.cat([a.repeat_rows(2), b])
    assert both.tokens.shape == (3, 5, DIM) and both.pooled.shape == (3, 3)
    assert both.mask.tolist() == [[True] * 3 + [False] * 2] * 2 + [[True] * 5]
    assert torch.equal(both.tokens[0, :3], a.tokens[0]) and not both.tokens[0, 3:].any()
    same = stack_inputs([context(4, 2), context(4, 3)])
    assert same.mask is None  # equal lengths need no mask


def test_cat_refuses_a_mix_of_pooled_and_not() -> None:
    with pytest.raises(ValueError, match="pooled"):
        TextContext.cat([context(2, 0), context(2, 1, pooled=False)])


def test_unguided_prompts_ignore_the_negative() -> None:
    prompt, negative = context(3, 0), context(2, 1)
    assert not Conditioning.prompts(2, prompt, negative, 1.0).guided
    guided = Conditioning.prompts(2, prompt, negative, 4.0)
    assert guided.guided and guided.rows_per_sample == 2 and guided.null_inputs.rows == 2


def test_a_mixed_text_batch_equals_each_state_alone() -> None:
    process = FlowProcess(shift=1.0)
    specs = [  # (prompt length, negative length, scale, sampler, steps, n)
        (3, 1, 4.0, "euler", 4, 2),
        (7, 2, 1.0, "dpmpp-2m", 6, 1),
        (5, 5, 2.5, "heun", 3, 1),
    ]

    def new(i: int):
        length, negative, scale, sampler, steps, n = specs[i]
        state = create_sampler(
            sampler, process, steps, (n, 2, 2, 2), torch.Generator().manual_seed(i)
        )
        cond = Conditioning.prompts(n, context(length, 10 + i), context(negative, 20 + i), scale)
        return state, cond

    alone = [sample(text_model, *new(i)) for i in range(len(specs))]
    pairs = [new(i) for i in range(len(specs))]
    active = list(range(len(specs)))
    while active:
        step_batch(text_model, [pairs[i][0] for i in active], [pairs[i][1] for i in active])
        active = [i for i in active if not pairs[i][0].done]
    for i, (state, _) in enumerate(pairs):
        torch.testing.assert_close(state.x, alone[i], atol=1e-5, rtol=0, msg=f"state {i}")
    # The prompt matters (the test can fail): another prompt gives another image.
    state, _ = new(0)
    other = Conditioning.prompts(2, context(3, 99), context(1, 20), 4.0)
    assert (sample(text_model, state, other) - alone[0]).abs().max() > 1e-2
