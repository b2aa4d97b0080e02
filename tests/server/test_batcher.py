"""The batcher's choices: budget, age order, shapes, fairness and the request-level mode."""

import random

import pytest

from denoised.server.batcher import Candidate, RequestBatcher, StepBatcher, make_batcher


def cand(id, model="a", shape=(4, 8, 8), samples=1, guided=False, params=None):
    return Candidate(id=id, model=model, shape=shape, samples=samples, guided=guided, params=params)


def test_guided_samples_cost_two_rows():
    assert cand(0, samples=3, guided=True).cost == 6
    assert cand(0, samples=3, guided=False).cost == 3


def test_oldest_first_within_budget_and_smaller_requests_fill_the_gap():
    batcher = StepBatcher(max_samples=8)
    pool = [
        cand(0, samples=2, guided=True),  # 4
        cand(1, samples=3),  # 3  -> 7
        cand(2, samples=2),  # 2  -> would be 9: skipped
        cand(3, samples=1),  # 1  -> 8
        cand(4, samples=1),
    ]
    assert [c.id for c in batcher.select(pool)] == [0, 1, 3]


def test_oldest_runs_alone_even_over_budget():
    batcher = StepBatcher(max_samples=1)
    pool = [cand(0, samples=2, guided=True), cand(1)]
    assert [c.id for c in batcher.select(pool)] == [0]


def test_only_one_latent_shape_per_forward():
    batcher = StepBatcher(max_samples=64)
    pool = [cand(0, shape=(4, 8, 8)), cand(1, shape=(4, 16, 16)), cand(2, shape=(4, 8, 8))]
    assert [c.id for c in batcher.select(pool)] == [0, 2]


def test_mixed_parameters_share_a_forward_in_step_mode():
    batcher = StepBatcher(max_samples=64)
    pool = [cand(i, params=("ddim", 10 + i)) for i in range(5)]
    assert [c.id for c in batcher.select(pool)] == [0, 1, 2, 3, 4]


def test_models_take_turns():
    batcher = StepBatcher(max_samples=64)
    pool = [cand(0, "a"), cand(1, "b"), cand(2, "a"), cand(3, "c")]
    served = [batcher.select(pool)[0].model for _ in range(6)]
    assert served == ["a", "b", "c", "a", "b", "c"]


def test_fairness_holds_on_random_traffic():
    rng = random.Random(0)
    batcher = StepBatcher(max_samples=4)
    models = ["a", "b", "c"]
    pool = [cand(i, rng.choice(models), samples=rng.randint(1, 3)) for i in range(60)]
    counts = dict.fromkeys(models, 0)
    for _ in range(30):
        chosen = batcher.select(pool)
        assert len({c.model for c in chosen}) == 1
        assert sum(c.cost for c in chosen) <= 4 or len(chosen) == 1
        counts[chosen[0].model] += 1
    assert counts == dict.fromkeys(models, 10)


def test_request_mode_batches_equal_params_and_runs_them_to_completion():
    batcher = RequestBatcher(max_samples=64)
    pool = [cand(0, params="p"), cand(1, params="q"), cand(2, params="p")]
    assert [c.id for c in batcher.select(pool)] == [0, 2]
    # A newcomer with equal parameters does not join a running batch.
    pool = [*pool, cand(3, params="p")]
    assert [c.id for c in batcher.select(pool)] == [0, 2]
    # Request 0 finishes; the batch continues with what is left of it.
    pool = [c for c in pool if c.id != 0]
    assert [c.id for c in batcher.select(pool)] == [2]
    pool = [c for c in pool if c.id != 2]
    assert [c.id for c in batcher.select(pool)] == [1]
    pool = [c for c in pool if c.id != 1]
    assert [c.id for c in batcher.select(pool)] == [3]
    assert batcher.select([]) == []


def test_empty_and_bad_settings():
    assert StepBatcher(4).select([]) == []
    with pytest.raises(ValueError, match="max_samples"):
        StepBatcher(0)
    with pytest.raises(ValueError, match="step"):
        make_batcher("static", 4)
    assert isinstance(make_batcher("request", 4), RequestBatcher)
