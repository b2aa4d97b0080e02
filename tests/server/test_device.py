"""`--dtype auto` on CPU (`server/device.py`): bf16 detection from injected CPU flags, and
the per-model tolerance check that decides whether a model moves to bfloat16."""

import pytest
import torch
from tiny_models import write_tiny_models

from denoised.models.checkpoints.model_dir import load_model_dir
from denoised.server import device as device_module
from denoised.server.device import (
    bf16_error,
    check_inputs,
    cpu_flags,
    native_bf16,
    resolve_device,
    settle_dtype,
)
from denoised.server.settings import Settings

CPU = torch.device("cpu")
ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
SKYLAKE = {"avx2", "avx512f", "avx512bw"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"), latent=True)


def test_cpu_flags_come_from_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    "flags, native", [(ZEN4, True), (SAPPHIRE_RAPIDS, True), (SKYLAKE, False), (set(), False)]
)
def test_native_bf16_needs_amx_or_avx512_bf16(flags, native):
    assert native_bf16(flags) is native


def test_models_load_in_float32_on_cpu_and_in_bf16_on_cuda_by_default():
    assert resolve_device(Settings(device="cpu"), ZEN4) == (CPU, torch.float32)
    assert resolve_device(Settings(device="cpu", dtype="bfloat16"), SKYLAKE)[1] == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(Settings(device="cuda"))


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-latent"])
def test_auto_moves_a_model_that_stays_close_to_bf16(dirs, name):
    loaded = load_model_dir(dirs[name])
    assert settle_dtype(loaded, CPU, Settings(), ZEN4) == torch.bfloat16
    assert next(loaded.backbone.parameters()).dtype == torch.bfloat16
    if loaded.vae is not None:
        assert next(loaded.vae.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "settings, flags",
    [(Settings(), SKYLAKE), (Settings(dtype="float32"), ZEN4)],
    ids=["no native bf16", "float32 forced"],
)
def test_auto_keeps_float32_without_native_bf16_or_when_forced(dirs, settings, flags):
    loaded = load_model_dir(dirs["tiny-dit"])
    assert settle_dtype(loaded, CPU, settings, flags) == torch.float32
    assert next(loaded.backbone.parameters()).dtype == torch.float32


def test_a_model_over_the_tolerance_stays_float32(dirs, monkeypatch, caplog):
    loaded = load_model_dir(dirs["tiny-dit"])
    before = loaded.backbone
    monkeypatch.setattr(device_module, "BF16_TOLERANCE", 0.0)
    assert settle_dtype(loaded, CPU, Settings(), ZEN4) == torch.float32
    assert loaded.backbone is before
    assert "stays float32" in caplog.text


def test_the_check_measures_the_bf16_difference_on_serving_inputs(dirs):
    loaded = load_model_dir(dirs["tiny-flow"])
    x, t, y = check_inputs(loaded)
    assert x.shape[1:] == loaded.latent_shape and t.shape == y.shape == x.shape[:1]
    assert len(set(t.tolist())) == x.shape[0]  # one noise level per row
    bf16 = load_model_dir(dirs["tiny-flow"], dtype=torch.bfloat16).backbone

    def call(module, dtype):
        return module(x.to(dtype), t, y)

    error = bf16_error(loaded.backbone, bf16, call)
    assert 0 < error < device_module.BF16_TOLERANCE
