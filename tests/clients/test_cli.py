"""`denoised-client` and `denoised-bench` command lines against a real server."""

import io
import json

import pytest
from PIL import Image

from denoised_client.bench.cli import main as bench_main
from denoised_client.cli import main


def test_generate_with_a_progress_bar_saves_the_image(server, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["--url", server.url, "generate", "--model", "tiny-dit", "--label", "3",
                 "--sampler", "dpmpp-2m", "--steps", "20", "--guidance", "3", "--seed", "4",
                 "-o", str(out)])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    bar = captured.err.split("\r")
    assert [line.split("] ")[1].split(" ")[0] for line in bar[1:]] == [
        f"{i}/20" for i in range(1, 21)
    ]
    assert "[" + "#" * 30 + "] 20/20 steps" in captured.err
    assert "sampler=dpmpp-2m steps=20 guidance=3.0 seed=4" in captured.err
    assert Image.open(io.BytesIO(out.read_bytes())).size == (8, 8)


def test_generate_several_webp_images_by_class_id_with_options(server, tmp_path, capsys):
    out = tmp_path / "digit.webp"
    code = main(["--url", server.url, "generate", "--model", "tiny-flow", "--label", "id:9",
                 "-n", "2", "--sampler", "ddim", "--steps", "3", "--option", "eta=1.0",
                 "--no-progress", "-o", str(out)])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "label=9 sampler=ddim steps=3" in captured.err and "\r" not in captured.err
    paths = captured.out.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["digit-0.webp", "digit-1.webp"]
    assert all(Image.open(p).format == "WEBP" for p in paths)


def test_models_and_health(server, capsys):
    assert main(["--url", server.url, "models", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in models] == ["tiny-dit", "tiny-flow"]
    assert models[0]["defaults"]["sampler"] in models[0]["samplers"]
    assert main(["--url", server.url, "models"]) == 0
    assert capsys.readouterr().out.startswith("tiny-dit\tdit/vp\t8x8\t10 classes")
    assert main(["--url", server.url, "health"]) == 0
    assert capsys.readouterr().out.strip() == "ready: tiny-dit, tiny-flow"


def test_server_errors_print_the_message_and_exit_1(server, closed_port, tmp_path, capsys):
    code = main(["--url", server.url, "generate", "--label", "cat", "-o", str(tmp_path / "x")])
    assert code == 1
    err = capsys.readouterr().err
    assert "422" in err and "'label'" in err and "unknown class 'cat'" in err
    assert main(["--url", f"http://127.0.0.1:{closed_port}", "--retries", "0", "health"]) == 1
    assert "ConnectError" in capsys.readouterr().err
    assert main(["generate", "--option", "eta"]) == 1
    assert "NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--concurrency", "2"], []),  # neither a duration nor a count: 10 s default is fine
        (["--concurrency", "0", "--requests", "1"], ["concurrency must be a whole number"]),
        (["--rate", "0", "--requests", "1"], ["arrival rate must be > 0"]),
        (["--requests", "1"], ["at least one concurrency or arrival rate"]),
        (["--concurrency", "1", "--requests", "1", "--duration", "1"], ["exactly one"]),
        (["--concurrency", "x"], ["comma-separated list"]),
        (["--concurrency", "1", "--mix", "/nonexistent.json"], ["nonexistent.json"]),
        (["--concurrency", "1", "--sampler", "ddim", "--group-by", "colour"], ["group_by"]),
    ],
)
def test_bench_arguments_are_checked_before_any_request(args, words, capsys, closed_port):
    url = f"http://127.0.0.1:{closed_port}"  # nothing listens: a run would fail differently
    if not words:
        from denoised_client.bench.cli import _parser, config_from_args

        config = config_from_args(_parser().parse_args(["--url", url, *args]))
        assert config.limit.duration == 10.0 and config.rounds == 1
        return
    with pytest.raises(SystemExit) as exited:
        bench_main(["--url", url, *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
