"""The `denoised` command line: flags reach the settings, bad input stops with a message."""

import pytest

from denoised.server.cli import main


def test_serve_refuses_a_directory_without_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "is not a model directory (no config.json)" in capsys.readouterr().err


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
