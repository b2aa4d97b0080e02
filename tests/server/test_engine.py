"""The engine with real tiny models (no HTTP): batch invariance across mixed batches, faults
that fail one request alone, deadlines, cancellation, admission limits, both batching modes,
and the row limit that out-of-memory forwards lower and successes probe back up."""

import asyncio
import dataclasses
import math

import numpy as np
import pytest
import torch
from tiny_models import write_tiny_models

from denoised.server.admission import GenerationRequest, admit
from denoised.server.engine.jobs import Draining, Job, JobError, JobResult, QueueFull
from denoised.server.engine.loop import Engine
from denoised.server.engine.queues import JobQueues
from denoised.server.metrics import Metrics
from denoised.server.registry import load_registry
from denoised.server.settings import Settings

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    dirs = write_tiny_models(tmp_path_factory.mktemp("models"), latent=True)
    return load_registry(list(dirs.values()), CPU, torch.float32)


@pytest.fixture
def make_engine(registry):
    engines = []

    def make(probe_after: int = 64, **overrides) -> Engine:
        settings = Settings(compile=False, warmup=False, **overrides)
        engine = Engine(registry, settings, Metrics(), CPU, probe_after)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def prepare(engine: Engine, loop, model: str, label=None, **fields) -> Job:
    request = GenerationRequest(label=label, output_format="npy", **fields)
    served = engine.registry.get(model)
    params, state = admit(served, request, engine.settings, "test", CPU)
    return Job(params, state, loop)


async def run_jobs(engine: Engine, specs, tamper=None) -> list:
    """Submit every spec, then start the engine (if it is not running yet, so the first
    iteration sees them all); wait for all. `tamper(i, job)` may inject a fault."""
    loop = asyncio.get_running_loop()
    jobs = [prepare(engine, loop, **spec) for spec in specs]
    if tamper:
        jobs = [tamper(i, job) for i, job in enumerate(jobs)]
    for job in jobs:
        engine.submit(job)
    engine.start()
    return await asyncio.gather(*(job.result for job in jobs), return_exceptions=True)


MIXED = [
    dict(model="tiny-dit", label="3", n=2, sampler="dpmpp-2m", steps=6, guidance_scale=3.0, seed=1),
    dict(model="tiny-dit", label=7, sampler="ddim", steps=4, seed=2,
         sampler_options={"eta": 1.0}),
    dict(model="tiny-dit", sampler="heun", steps=3, seed=3),
    dict(model="tiny-dit", label="0", sampler="dpmpp-2m-sde", steps=5, guidance_scale=2.0, seed=4),
    dict(model="tiny-dit", label="5", sampler="unipc", steps=6, guidance_scale=1.5, seed=5),
    dict(model="tiny-flow", label="1", sampler="euler", steps=4, guidance_scale=2.5, seed=6),
    dict(model="tiny-flow", label="2", n=3, sampler="dpmpp-3m", steps=6, seed=7),
]  # fmt: skip


def run_alone(registry, specs) -> list:
    """Every request run by itself (max_batch 1: nothing shares a forward), no faults."""
    engine = Engine(registry, Settings(compile=False, warmup=False, max_batch=1), Metrics(), CPU)
    results = [asyncio.run(run_jobs(engine, [spec]))[0] for spec in specs]
    engine.stop()
    return results


@pytest.fixture(scope="module")
def solo(registry):
    return run_alone(registry, MIXED)


def batch_requests(engine: Engine, model: str) -> tuple[float, float]:
    get = engine.metrics.registry.get_sample_value
    labels = {"model": model}
    return get("denoised_batch_requests_sum", labels), get("denoised_batch_requests_count", labels)


def test_same_request_and_seed_give_the_same_images_alone_or_in_a_mixed_batch(make_engine, solo):
    engine = make_engine(max_batch=64)
    mixed = asyncio.run(run_jobs(engine, MIXED))
    for spec, alone, together in zip(MIXED, solo, mixed, strict=True):
        assert isinstance(together, JobResult), together
        assert together.pixels.shape == (spec.get("n", 1), 8, 8, 1)
        np.testing.assert_allclose(together.pixels, alone.pixels, atol=1e-4, rtol=0)
    # The requests really did share forwards: more than one request per forward on average.
    total, forwards = batch_requests(engine, "tiny-dit")
    assert total / forwards > 1.5
    # Different seeds give different images.
    assert np.abs(mixed[0].pixels - mixed[1].pixels[:1].repeat(2, 0)).max() > 1e-2


def test_a_request_that_goes_nan_fails_alone(make_engine, solo):
    engine = make_engine()

    def poison(i, job):
        if i == 1:
            job.state.x[0, 0, 0, 0] = float("nan")
        return job

    results = asyncio.run(run_jobs(engine, MIXED[:3], tamper=poison))
    assert isinstance(results[1], JobError) and results[1].status == 500
    assert "non-finite" in results[1].message
    for i in (0, 2):
        np.testing.assert_allclose(results[i].pixels, solo[i].pixels, atol=1e-4, rtol=0)
    failed = engine.metrics.registry.get_sample_value(
        "denoised_requests_total", {"model": "tiny-dit", "sampler": "ddim", "status": "failed"}
    )
    assert failed == 1


def test_a_request_whose_forward_raises_fails_alone(make_engine, solo):
    engine = make_engine()

    def bad_label(i, job):  # an id past the class table: the embedding lookup raises
        if i == 0:
            past = torch.full_like(job.conditioning.inputs, 10_000)
            job.conditioning = dataclasses.replace(job.conditioning, inputs=past)
        return job

    results = asyncio.run(run_jobs(engine, MIXED[:3], tamper=bad_label))
    assert isinstance(results[0], JobError) and results[0].status == 500
    assert "IndexError" in results[0].message
    for i in (1, 2):
        np.testing.assert_allclose(results[i].pixels, solo[i].pixels, atol=1e-4, rtol=0)


def test_latent_model_decodes_through_its_vae(make_engine):
    engine = make_engine()
    engine.start()
    spec = dict(model="tiny-latent", label="4", n=2, steps=3, guidance_scale=2.0, seed=0)
    (result,) = asyncio.run(run_jobs(engine, [spec]))
    assert result.pixels.shape == (2, 32, 32, 3)
    assert result.pixels.std() > 0


def test_deadline_fails_with_504_and_counts_a_miss(make_engine):
    engine = make_engine()
    engine.start()
    spec = dict(model="tiny-dit", steps=1000, timeout=0.2, seed=0)
    (result,) = asyncio.run(run_jobs(engine, [spec]))
    assert isinstance(result, JobError) and result.status == 504
    assert "timeout of 0.2 s exceeded" in result.message
    misses = engine.metrics.registry.get_sample_value(
        "denoised_deadline_misses_total", {"model": "tiny-dit"}
    )
    assert misses == 1


def test_cancel_frees_the_request_at_the_next_step(make_engine):
    engine = make_engine()
    engine.start()

    async def scenario():
        job = prepare(engine, asyncio.get_running_loop(), "tiny-dit", steps=1000, seed=0)
        engine.submit(job)
        while job.state.step_index < 2:
            await asyncio.sleep(0.01)
        engine.cancel(job)
        with pytest.raises(JobError) as info:
            await job.result
        return job, info.value

    job, error = asyncio.run(scenario())
    assert error.kind == "cancelled" and job.state.step_index < job.params.nfe
    assert engine.idle


def test_queued_requests_time_out_or_cancel_without_running_and_are_counted(make_engine):
    """Behind one long request (max_batch 1: nothing else runs), 40 queued requests with a
    short deadline answer 504 and 40 whose clients leave answer 499, none having run a step;
    the queue depth and active gauges count them throughout."""
    engine = make_engine(max_batch=1)
    gauge = engine.metrics.registry.get_sample_value

    def counts():
        labels = {"model": "tiny-dit"}
        return gauge("denoised_queue_depth", labels), gauge("denoised_active_requests", labels)

    async def scenario():
        loop = asyncio.get_running_loop()
        long = prepare(engine, loop, "tiny-dit", steps=1000, seed=0)
        late = [prepare(engine, loop, "tiny-dit", steps=2, timeout=0.5, seed=i) for i in range(40)]
        left = [prepare(engine, loop, "tiny-dit", steps=2, seed=i) for i in range(40)]
        for job in [long, *late, *left]:
            engine.submit(job)
        assert counts() == (81, 0)
        engine.start()
        while long.state.step_index < 1:  # counted when its first forward is chosen
            await asyncio.sleep(0.01)
        assert counts() == (80, 1)
        for job in left:
            engine.cancel(job)
        outcomes = await asyncio.gather(*(j.result for j in late + left), return_exceptions=True)
        assert counts() == (0, 1)
        engine.cancel(long)
        await asyncio.gather(long.result, return_exceptions=True)
        return late, left, outcomes

    late, left, outcomes = asyncio.run(scenario())
    assert [o.status for o in outcomes] == [504] * 40 + [499] * 40
    assert all("after 0 of 2 evaluations" in o.message for o in outcomes[:40])
    assert all(job.state.step_index == 0 for job in late + left)
    assert counts() == (0, 0) and engine.idle


def test_job_queues_keep_arrival_order_and_deadlines_and_forget_what_ended(make_engine):
    engine = make_engine()
    loop = asyncio.new_event_loop()
    timeouts = {"tiny-dit": (3.0, 1.0, 2.0), "tiny-flow": (0.5,)}
    jobs = [prepare(engine, loop, m, steps=2, timeout=t) for m, ts in timeouts.items() for t in ts]
    queues = JobQueues()
    for job in jobs:
        queues.add(job)
    assert {m: list(q) for m, q in queues.ready.items()} == {
        "tiny-dit": [j.seq for j in jobs[:3]],
        "tiny-flow": [jobs[3].seq],
    }
    assert all(queues.ready[j.params.model][j.seq].id == j.seq for j in jobs)
    start = max(job.admitted_at for job in jobs)
    assert queues.expired(start + 1.5) == [jobs[3], jobs[1]]  # by deadline, not arrival
    assert queues.expired(start + 1.5) == []  # each deadline is reported once
    for job in jobs[1:]:
        assert queues.remove(job)
    assert not queues.remove(jobs[2])  # already gone
    assert list(queues.ready) == ["tiny-dit"] and queues.expired(start + 2.5) == []
    # Deadlines of ended jobs do not pile up: the heap is rebuilt from the live jobs.
    for i in range(1000):
        job = prepare(engine, loop, "tiny-dit", steps=2, seed=i)
        queues.add(job)
        queues.remove(job)
    assert len(queues._deadlines) <= 4 * (len(queues.jobs) + 16)
    assert queues.expired(start + 4) == [jobs[0]]
    loop.close()


def test_queue_limit_and_drain_refuse_admission(make_engine):
    engine = make_engine(max_queue=1)  # not started: nothing leaves the queue

    async def scenario():
        loop = asyncio.get_running_loop()
        engine.submit(prepare(engine, loop, "tiny-dit", steps=2))
        with pytest.raises(QueueFull) as full:
            engine.submit(prepare(engine, loop, "tiny-dit", steps=2))
        engine.drain()
        with pytest.raises(Draining):
            engine.submit(prepare(engine, loop, "tiny-dit", steps=2))
        return full.value

    full = asyncio.run(scenario())
    assert full.status == 429 and full.retry_after >= 1


def test_request_mode_batches_only_equal_parameters(make_engine):
    engine = make_engine(batching="request")
    base = dict(model="tiny-dit", label="1", sampler="ddim", guidance_scale=2.0)
    equal = [dict(base, steps=5, seed=s) for s in range(3)]
    results = asyncio.run(run_jobs(engine, equal))
    assert all(isinstance(r, JobResult) for r in results)
    total, forwards = batch_requests(engine, "tiny-dit")
    assert (total, forwards) == (15, 5)  # three requests in each of five forwards

    engine = make_engine(batching="request")
    different = [dict(base, steps=4 + s, seed=s) for s in range(3)]
    asyncio.run(run_jobs(engine, different))
    total, forwards = batch_requests(engine, "tiny-dit")
    assert total == forwards == 4 + 5 + 6  # never shared


def test_warm_up_runs_every_model(registry):
    engine = Engine(registry, Settings(compile=False), Metrics(), CPU)
    engine.warm_up()
    assert engine.idle
    assert set(registry.models) == {"tiny-dit", "tiny-flow", "tiny-latent"}
    assert not registry.unavailable


def test_a_model_that_fails_its_warm_up_is_dropped_and_the_others_serve(tmp_path):
    """tiny-dit with NaN weights: its warm-up produces non-finite values, so it is listed as
    unavailable with the reason, tiny-flow (the next model) becomes the default and serves;
    with no model left the warm-up raises."""
    dirs = write_tiny_models(tmp_path)
    registry = load_registry([dirs["tiny-dit"], dirs["tiny-flow"]], CPU, torch.float32)
    with torch.no_grad():
        for param in registry.models["tiny-dit"].loaded.backbone.parameters():
            param.fill_(float("nan"))
    engine = Engine(registry, Settings(compile=False), Metrics(), CPU)
    engine.warm_up()
    assert list(registry.models) == ["tiny-flow"] and registry.default == "tiny-flow"
    assert "warm-up failed" in registry.unavailable["tiny-dit"]
    assert "non-finite" in registry.unavailable["tiny-dit"]
    assert set(engine.runners) == {"tiny-flow"}
    with torch.no_grad():
        for param in registry.models["tiny-flow"].loaded.backbone.parameters():
            param.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="no model left to serve"):
        Engine(registry, Settings(compile=False), Metrics(), CPU).warm_up()


# Eight tiny-dit requests, half guided: 12 rows in all, so with oom_above_rows=6 a forward of
# all of them runs out of memory and its halves (6 rows each) fit. Two tiny-flow requests
# (2 rows) never do.
CROWD = [
    dict(model="tiny-dit", label=str(i), sampler=("ddim", "dpmpp-2m")[i % 2], steps=16,
         guidance_scale=(2.0, 1.0)[i % 2], seed=10 + i)
    for i in range(8)
] + [dict(model="tiny-flow", label=str(i), sampler="euler", steps=16, seed=20 + i)
     for i in range(2)]  # fmt: skip
OOM_ROWS = 6


@pytest.fixture(scope="module")
def crowd_alone(registry):
    return run_alone(registry, CROWD)


def oom_metrics(engine: Engine, model: str) -> tuple[float, float, float]:
    """(out-of-memory forwards, iterations, current row limit) of a model."""
    get = engine.metrics.registry.get_sample_value
    labels = {"model": model}
    return (
        get("denoised_oom_total", labels),
        get("denoised_batch_requests_count", labels),
        get("denoised_batch_limit", labels),
    )


def assert_all_match_alone(results, alone) -> None:
    for spec, got, want in zip(CROWD, results, alone, strict=True):
        assert isinstance(got, JobResult), (spec, got)
        np.testing.assert_allclose(got.pixels, want.pixels, atol=1e-4, rtol=0)


def test_after_an_out_of_memory_forward_later_ones_are_planned_under_the_limit(
    make_engine, crowd_alone
):
    engine = make_engine(max_batch=16, fault_injection=f"oom_above_rows={OOM_ROWS}")
    results = asyncio.run(run_jobs(engine, CROWD))
    assert_all_match_alone(results, crowd_alone)
    ooms, iterations, limit = oom_metrics(engine, "tiny-dit")
    # Only the first forward of all 12 rows ran out of memory (without the limit: every one
    # of the 16 iterations would); the rest ran in forwards of at most 6 rows, so twice as many.
    assert ooms == 1
    assert limit == OOM_ROWS
    assert iterations >= 2 * 16 - 2
    assert oom_metrics(engine, "tiny-flow") == (0, 16, 16)  # the limit is per model


def test_a_lasting_shortage_costs_one_failed_forward_per_probe(make_engine, crowd_alone):
    probe_after = 3
    engine = make_engine(
        max_batch=16, fault_injection=f"oom_above_rows={OOM_ROWS}", probe_after=probe_after
    )
    results = asyncio.run(run_jobs(engine, CROWD))
    assert_all_match_alone(results, crowd_alone)
    ooms, iterations, limit = oom_metrics(engine, "tiny-dit")
    # Probes come after 3, 6, 12, ... successes (the wait doubles after each failed one), and
    # each failed probe costs one out-of-memory forward: logarithmic in the iterations.
    probes = math.floor(math.log2(iterations / probe_after + 1))
    assert 2 <= ooms <= 1 + probes < iterations / 4, (ooms, probes, iterations)
    assert limit <= 2 * OOM_ROWS


def test_after_a_transient_shortage_the_limit_returns_to_max_batch(make_engine, crowd_alone):
    engine = make_engine(
        max_batch=16, fault_injection=f"oom_above_rows={OOM_ROWS},oom_times=1", probe_after=3
    )
    results = asyncio.run(run_jobs(engine, CROWD))
    assert_all_match_alone(results, crowd_alone)
    ooms, iterations, limit = oom_metrics(engine, "tiny-dit")
    assert ooms == 1 and limit == 16
    # 1 iteration of all 12 rows (ran out, split), 3 at 6 rows, then all 12 rows together
    # again: far fewer iterations than running the two halves apart throughout (31).
    assert iterations <= 16 + 4
