"""The compiled backbone path (`server/engine/compiled.py`) against eager: bucketing, padding
that leaves real rows alone, float32 and bfloat16 numerics, and the engine serving compiled.

CUDA graphs cannot run here; their padding to buckets is the same code, forced on CPU."""

import asyncio
import copy

import numpy as np
import pytest
import torch
from test_engine import MIXED, run_alone, run_jobs
from tiny_models import write_tiny_models

from denoised.server.device import check_inputs
from denoised.server.engine.compiled import (
    CompiledBackbone,
    batch_buckets,
    bucket_for,
    compile_backbone,
    pad_rows,
)
from denoised.server.engine.jobs import JobResult
from denoised.server.engine.loop import Engine
from denoised.server.engine.runner import ModelRunner
from denoised.server.metrics import Metrics
from denoised.server.registry import load_registry
from denoised.server.settings import Settings

CPU = torch.device("cpu")
# Inductor reorders and fuses float32 arithmetic: differences of a few ulps of the outputs.
FLOAT32_ATOL = 1e-4
# bf16 rounds every stored activation (2⁻⁹ relative); eager and compiled round in different
# places, and a row's result may depend on the batch's blocking in oneDNN's bf16 matmuls.
BF16_RELATIVE = 2e-2


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    dirs = write_tiny_models(tmp_path_factory.mktemp("models"), latent=True)
    return load_registry(list(dirs.values()), CPU, torch.float32)


def batch(loaded, rows: int, dtype: torch.dtype = torch.float32):
    """`rows` backbone inputs of `loaded` (its dtype-check inputs, repeated with new noise)."""
    x, t, y = check_inputs(loaded)
    reps = -(-rows // x.shape[0])
    x = torch.randn((x.shape[0] * reps, *x.shape[1:]), generator=torch.Generator().manual_seed(1))
    return x[:rows].to(dtype), t.repeat(reps)[:rows], None if y is None else y.repeat(reps)[:rows]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_buckets_are_powers_of_two_up_to_the_batch_limit():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(1) == (1,)
    assert [bucket_for(r, batch_buckets(48)) for r in (1, 3, 16, 17, 33, 48, 50)] == [
        1, 4, 16, 32, 48, 48, 50,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_padding_repeats_the_first_row():
    x = torch.arange(6.0).reshape(3, 2)
    padded = pad_rows(x, 5)
    assert padded.shape == (5, 2)
    assert torch.equal(padded[:3], x) and torch.equal(padded[3:], x[:1].expand(2, 2))
    assert pad_rows(x, 3) is x and pad_rows(None, 4) is None


@pytest.mark.slow
@torch.inference_mode()
def test_compiled_matches_eager_at_every_size_padded_or_not(registry):
    """Padding to buckets (as under CUDA graphs) and the dynamic batch (CPU) both give the
    eager rows: padding rows change nothing in the real ones."""
    loaded = registry.get("tiny-dit").loaded
    dynamic = compile_backbone(loaded.backbone, max_batch=8)
    assert dynamic.buckets is None  # CPU: no padding
    padded = CompiledBackbone(loaded.backbone, batch_buckets(8))
    for rows in (1, 2, 3, 5, 8):
        x, t, y = batch(loaded, rows)
        want = loaded.backbone(x, t, y)
        for compiled in (dynamic, padded):
            got = compiled(x, t, y)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=FLOAT32_ATOL, rtol=0)


@torch.inference_mode()
def test_compiled_bf16_matches_eager_and_is_batch_invariant(registry):
    loaded = registry.get("tiny-flow").loaded
    bf16 = copy.deepcopy(loaded.backbone).to(torch.bfloat16)
    compiled = CompiledBackbone(bf16, batch_buckets(8))
    x, t, y = batch(loaded, 7, torch.bfloat16)
    together = compiled(x, t, y)
    assert together.dtype == torch.bfloat16
    assert relative(together, bf16(x, t, y)) < BF16_RELATIVE
    for row in (0, 4):  # alone (bucket 1) vs in a padded batch of 8
        alone = compiled(x[row : row + 1], t[row : row + 1], y[row : row + 1])
        assert relative(alone, together[row : row + 1]) < BF16_RELATIVE


def test_compile_warm_up_covers_the_sizes_it_will_see(registry):
    loaded = registry.get("tiny-dit").loaded
    assert compile_backbone(loaded.backbone, 64).warm_sizes() == (2,)
    padded = CompiledBackbone(loaded.backbone, batch_buckets(4))
    assert padded.warm_sizes() == (2, 4)  # one row runs padded to two
    assert padded.warm_up(batch(loaded, 1)) > 0


@pytest.mark.slow
def test_the_engine_serves_the_same_images_compiled(registry):
    """A mixed batch through a compiled engine (warm-up compiles every model) equals the
    eager requests run alone."""
    solo = run_alone(registry, MIXED)
    engine = Engine(registry, Settings(max_batch=64), Metrics(), CPU)
    try:
        engine.warm_up()
        assert all(runner.compiled is not None for runner in engine.runners.values())
        results = asyncio.run(run_jobs(engine, MIXED))
    finally:
        engine.stop()
    for alone, together in zip(solo, results, strict=True):
        assert isinstance(together, JobResult), together
        np.testing.assert_allclose(together.pixels, alone.pixels, atol=1e-3, rtol=0)


def test_a_backbone_that_fails_to_compile_is_served_eager(registry, monkeypatch):
    def no_compiler(self, example):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(CompiledBackbone, "warm_up", no_compiler)
    loaded = registry.get("tiny-dit").loaded
    runner = ModelRunner(loaded, compiled=True)
    assert runner.compile() == 0.0
    assert runner.compiled is None
    x, t, y = batch(loaded, 3)
    with torch.inference_mode():
        torch.testing.assert_close(runner._forward(x, t, y), loaded.backbone(x, t, y))
