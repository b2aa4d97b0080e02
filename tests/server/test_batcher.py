"""The batcher's choices: budget, age order, shapes, fairness, the request-level mode, and the
per-model row limit that out-of-memory errors lower and successes probe back up."""

import random

import pytest

from denoised.server.engine.batcher import (
    LOOKAHEAD,
    MAX_PROBE_WAIT_FACTOR,
    BatchLimit,
    Candidate,
    RequestBatcher,
    StepBatcher,
    make_batcher,
)


def cand(id, model="a", shape=(4, 8, 8), samples=1, guided=False, params=None):
    return Candidate(id=id, model=model, shape=shape, samples=samples, guided=guided, params=params)


def queues(pool):
    """`pool` (oldest first) as the engine keeps it: each model's candidates by id."""
    by_model = {}
    for c in pool:
        by_model.setdefault(c.model, {})[c.id] = c
    return by_model


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
    assert [c.id for c in batcher.select(queues(pool))] == [0, 1, 3]


def test_oldest_runs_alone_even_over_budget():
    batcher = StepBatcher(max_samples=1)
    pool = [cand(0, samples=2, guided=True), cand(1)]
    assert [c.id for c in batcher.select(queues(pool))] == [0]


def test_text_inputs_count_against_their_byte_budget():
    # Rows would allow all four; the text inputs (prompt embeddings or caches) allow 100 bytes.
    pool = [Candidate(i, "a", (4, 8, 8), 1, True, text_bytes=b) for i, b in
            enumerate((60, 50, 30, 10))]  # fmt: skip
    for batcher in (StepBatcher(64, max_text_bytes=100), make_batcher("request", 64, 100)):
        assert [c.id for c in batcher.select(queues(pool))] == [0, 2, 3]  # 60 + 30 + 10
    assert [c.id for c in StepBatcher(64).select(queues(pool))] == [0, 1, 2, 3]  # no byte budget
    alone = [Candidate(0, "a", (4, 8, 8), 1, True, text_bytes=500), pool[3]]
    assert [c.id for c in StepBatcher(64, 100).select(queues(alone))] == [
        0
    ]  # the oldest still runs


class CountingQueue(dict):
    """A model's queue that counts the candidates a selection reads."""

    read = 0

    def values(self):
        for value in super().values():
            CountingQueue.read += 1
            yield value


@pytest.mark.parametrize("mode", ["step", "request"])
def test_a_selection_reads_as_far_as_the_forward_needs_not_the_whole_queue(mode):
    batcher = make_batcher(mode, max_samples=8)
    for waiting in (10, 10_000):
        queue = CountingQueue((i, cand(i, samples=1, guided=True)) for i in range(waiting))
        CountingQueue.read = 0
        assert [c.id for c in batcher.select({"a": queue})] == [0, 1, 2, 3]
        assert CountingQueue.read == 4
        batcher = make_batcher(mode, max_samples=8)  # request mode: a new batch each time


def test_younger_requests_fill_a_gap_within_the_lookahead_only():
    batcher = StepBatcher(max_samples=8)
    big = [cand(i, samples=2, guided=True) for i in range(1, 1 + 2 * LOOKAHEAD)]  # 4 rows each
    first = cand(0, samples=5)  # 5 rows: the big ones no longer fit, a small one would
    near = [first, *big[:LOOKAHEAD], cand(1000, samples=1), *big[LOOKAHEAD:]]
    assert [c.id for c in batcher.select(queues(near))] == [0, 1000]
    far = [first, *big, cand(1000, samples=1)]
    assert [c.id for c in batcher.select(queues(far))] == [0]  # passed over too many to reach it
    # Other shapes count as passed over too: the oldest's shape runs, within the look-ahead.
    other = [cand(i, shape=(4, 16, 16)) for i in range(1, LOOKAHEAD + 2)]
    assert [c.id for c in batcher.select(queues([first, *other, cand(999)]))] == [0]
    assert [c.id for c in batcher.select(queues([first, *other[1:], cand(999)]))] == [0, 999]


def test_only_one_latent_shape_per_forward():
    batcher = StepBatcher(max_samples=64)
    pool = [cand(0, shape=(4, 8, 8)), cand(1, shape=(4, 16, 16)), cand(2, shape=(4, 8, 8))]
    assert [c.id for c in batcher.select(queues(pool))] == [0, 2]


def test_mixed_parameters_share_a_forward_in_step_mode():
    batcher = StepBatcher(max_samples=64)
    pool = [cand(i, params=("ddim", 10 + i)) for i in range(5)]
    assert [c.id for c in batcher.select(queues(pool))] == [0, 1, 2, 3, 4]


def test_models_take_turns():
    batcher = StepBatcher(max_samples=64)
    pool = [cand(0, "a"), cand(1, "b"), cand(2, "a"), cand(3, "c")]
    served = [batcher.select(queues(pool))[0].model for _ in range(6)]
    assert served == ["a", "b", "c", "a", "b", "c"]


def test_fairness_holds_on_random_traffic():
    rng = random.Random(0)
    batcher = StepBatcher(max_samples=4)
    models = ["a", "b", "c"]
    pool = [cand(i, rng.choice(models), samples=rng.randint(1, 3)) for i in range(60)]
    counts = dict.fromkeys(models, 0)
    for _ in range(30):
        chosen = batcher.select(queues(pool))
        assert len({c.model for c in chosen}) == 1
        assert sum(c.cost for c in chosen) <= 4 or len(chosen) == 1
        counts[chosen[0].model] += 1
    assert counts == dict.fromkeys(models, 10)


def test_request_mode_batches_equal_params_and_runs_them_to_completion():
    batcher = RequestBatcher(max_samples=64)
    pool = [cand(0, params="p"), cand(1, params="q"), cand(2, params="p")]
    assert [c.id for c in batcher.select(queues(pool))] == [0, 2]
    # A newcomer with equal parameters does not join a running batch.
    pool = [*pool, cand(3, params="p")]
    assert [c.id for c in batcher.select(queues(pool))] == [0, 2]
    # Request 0 finishes; the batch continues with what is left of it.
    pool = [c for c in pool if c.id != 0]
    assert [c.id for c in batcher.select(queues(pool))] == [2]
    pool = [c for c in pool if c.id != 2]
    assert [c.id for c in batcher.select(queues(pool))] == [1]
    pool = [c for c in pool if c.id != 1]
    assert [c.id for c in batcher.select(queues(pool))] == [3]
    assert batcher.select(queues([])) == []


def test_empty_and_bad_settings():
    assert StepBatcher(4).select(queues([])) == []
    with pytest.raises(ValueError, match="max_samples"):
        StepBatcher(0)
    with pytest.raises(ValueError, match="step"):
        make_batcher("static", 4)
    assert isinstance(make_batcher("request", 4), RequestBatcher)


def test_a_models_limit_bounds_only_its_own_forwards():
    batcher = StepBatcher(max_samples=16)
    pool = [cand(i, "a" if i % 2 else "b", samples=1 + i % 3) for i in range(20)]
    limits = {"a": 5}
    for _ in range(6):
        chosen = batcher.select(queues(pool), limits)
        rows = sum(c.cost for c in chosen)
        if chosen[0].model == "a":
            assert rows == 5  # oldest first, smaller ones filling the gap
        else:
            assert 5 < rows <= 16
    # A lone request over the limit still runs, alone.
    assert [
        c.id for c in batcher.select(queues([cand(0, samples=4, guided=True), cand(1)]), {"a": 5})
    ] == [0]


def test_request_mode_runs_a_batch_over_the_limit_in_parts():
    batcher = RequestBatcher(max_samples=64)
    pool = [cand(i, params="p", samples=2) for i in range(5)]
    assert [c.id for c in batcher.select(queues(pool))] == [0, 1, 2, 3, 4]
    # The limit drops below the running batch: its oldest part runs, the rest waits its turn.
    assert [c.id for c in batcher.select(queues(pool), {"a": 6})] == [0, 1, 2]
    pool = pool[3:]  # the first part finished
    assert [c.id for c in batcher.select(queues([*pool, cand(9, params="p")]), {"a": 6})] == [3, 4]


def succeed(limit: BatchLimit, iterations: int) -> None:
    for _ in range(iterations):
        limit.record([limit.rows], [])


def test_limit_after_out_of_memory_is_the_largest_forward_that_ran():
    limit = BatchLimit(16)
    assert limit.rows == 16
    limit.record([6, 4], [12, 10])  # 12 rows ran out, its halves 10 (out) then 6 and 4 ran
    assert limit.rows == 6
    limit.record([], [40])  # a lone request over the limit fails by itself: limit unchanged
    assert limit.rows == 6
    limit.record([], [5])  # nothing ran: just below what ran out
    assert limit.rows == 4
    limit.record([], [1])
    assert limit.rows == 1  # never below one row
    with pytest.raises(ValueError, match="probe_after"):
        BatchLimit(16, probe_after=0)


def test_limit_is_probed_up_after_successes_and_a_failed_probe_waits_longer():
    limit = BatchLimit(16, probe_after=3)
    limit.record([6, 6], [12])
    succeed(limit, 2)
    assert limit.rows == 6
    succeed(limit, 1)
    assert limit.rows == 12  # probe: doubled after three successes
    limit.record([6, 6], [12])  # the probe ran out of memory
    assert limit.rows == 6
    succeed(limit, 5)
    assert limit.rows == 6  # the next probe waits twice as long
    succeed(limit, 1)
    assert limit.rows == 12
    succeed(limit, 6)  # held for its whole wait: probed again, up to max_batch, no further
    assert limit.rows == 16
    succeed(limit, 3)  # ... which held too: the wait is back to three
    limit.record([8, 8], [16])  # a later shortage
    succeed(limit, 2)
    assert limit.rows == 8
    succeed(limit, 1)
    assert limit.rows == 16


def test_failed_probes_back_off_to_a_bounded_wait():
    limit = BatchLimit(64, probe_after=2)
    limit.record([4], [8])
    waits = []
    for _ in range(8):
        start = limit.rows
        count = 0
        while limit.rows == start:
            succeed(limit, 1)
            count += 1
        waits.append(count)
        limit.record([4], [8])  # every probe runs out of memory
    assert waits == [2, 4, 8, 16, 32] + [2 * MAX_PROBE_WAIT_FACTOR] * 3
