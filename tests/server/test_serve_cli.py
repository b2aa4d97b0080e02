"""The `denoised` command line: flags reach the settings, bad input stops with a message."""

import pytest
import torch

from denoised.models.checkpoints.model_dir import load_model_dir
from denoised.server.cli import main


def refusal(capsys, path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", str(path)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_serve_refuses_a_directory_without_config(tmp_path, capsys):
    assert f"{tmp_path} is not a model directory: config.json is missing" in refusal(
        capsys, tmp_path
    )


def test_serve_gives_the_loaders_hint_for_what_the_path_is(tmp_path, capsys):
    checkpoint = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save({}, checkpoint)
    err = refusal(capsys, checkpoint)
    assert f"{checkpoint} is a pickle checkpoint" in err
    assert f"`denoised convert {checkpoint} <output-dir>`" in err
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    torch.save({}, pickles / "pytorch_model.bin")
    assert "holds pickle checkpoints (pytorch_model.bin)" in refusal(capsys, pickles)
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    err = refusal(capsys, pipeline)
    assert f"{pipeline} is a diffusers pipeline folder" in err
    assert f"`denoised convert {pipeline} <output-dir>`" in err
    assert "does not exist" in refusal(capsys, tmp_path / "absent")
    # Each message is the loader's own: the CLI adds no diagnosis of its own.
    for path in (checkpoint, pickles, pipeline, tmp_path / "absent"):
        with pytest.raises(ValueError) as info:
            load_model_dir(path)
        assert str(info.value) in refusal(capsys, path)


def test_bad_setting_values_are_usage_errors(capsys, monkeypatch):
    monkeypatch.setenv("DENOISED_MAX_QUEUE", "lots")
    with pytest.raises(SystemExit):
        main(["serve"])
    assert "DENOISED_MAX_QUEUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--batching", "static"])
    assert "invalid choice: 'static'" in capsys.readouterr().err


def test_convert_is_delegated_to_the_converter(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    assert "denoised convert" in capsys.readouterr().out
