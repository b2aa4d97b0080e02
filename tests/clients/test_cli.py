"""`denoised-client` and `denoised-bench` command lines against a real server."""

import io
import json
import os
import select
import sys

import numpy as np
import pytest
from PIL import Image

from denoised_client.bench.cli import main as bench_main
from denoised_client.cli import main

BAR = "[" + "#" * 30 + "] 20/20 steps"


def generate_20_steps(url: str, out) -> int:
    return main(["--url", url, "generate", "--model", "tiny-dit", "--label", "3",
                 "--sampler", "dpmpp-2m", "--steps", "20", "--guidance", "3", "--seed", "4",
                 "-o", str(out)])  # fmt: skip


def test_generate_with_progress_lines_saves_the_image(server, tmp_path, capsys):
    """stderr is not a terminal here: the bar is written as plain lines, one per tenth."""
    out = tmp_path / "out.png"
    assert generate_20_steps(server.url, out) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "\r" not in captured.err
    lines = captured.err.splitlines()
    assert [line.split("] ")[1] for line in lines[:-1]] == [
        f"{i}/20 steps" for i in range(2, 21, 2)
    ]
    assert lines[-2] == BAR
    assert "sampler=dpmpp-2m steps=20 guidance=3.0 seed=4" in lines[-1]
    assert Image.open(io.BytesIO(out.read_bytes())).size == (8, 8)


def test_on_a_terminal_the_bar_is_redrawn_in_place(server, tmp_path, monkeypatch):
    reader, writer = os.openpty()
    with os.fdopen(writer, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert generate_20_steps(server.url, tmp_path / "out.png") == 0
    shown = b""
    while b"seed=4" not in shown:
        assert select.select([reader], [], [], 10)[0], f"the terminal got only {shown!r}"
        shown += os.read(reader, 4096)
    os.close(reader)
    frames = shown.decode().split("\r")[1:]  # the terminal turns "\n" into "\r\n"
    assert [f.split("] ")[1].split(" ")[0] for f in frames[:20]] == [
        f"{i}/20" for i in range(1, 21)
    ]
    assert frames[19].startswith(BAR)


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
    url = f"http://127.0.0.1:{closed_port}"
    assert main(["--url", url, "--retries", "0", "health"]) == 1
    assert f"ConnectError: [Errno 111] Connection refused (GET {url}/ready)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--option", "eta"], "argument --option: wants NAME=VALUE, got 'eta'"),
        (["--label", "id:x"], "id: takes a whole number, got 'id:x'"),
        (["-o", "x.jpg"], "-o x.jpg: the server writes .png, .webp, .npy files"),
        (["--format", "png", "-o", "x.webp"], "-o x.webp names a .webp file but --format is png"),
        (["--format", "npy", "-o", "x.PNG"], "-o x.PNG names a .png file but --format is npy"),
    ],
)
def test_arguments_that_cannot_work_are_usage_errors(args, words, closed_port, capsys):
    """Exit 2 with argparse's usage, before any request (nothing listens on the port)."""
    with pytest.raises(SystemExit) as exited:
        main(["--url", f"http://127.0.0.1:{closed_port}", "generate", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and words in err


def test_an_unwritable_output_fails_before_the_request(closed_port, tmp_path, capsys):
    """One line and exit 1, without sending: nothing listens on the port, so a request
    would have failed with a connection error instead."""
    url = f"http://127.0.0.1:{closed_port}"
    for output, why in [
        ("/nonexistent/dir/x.png", "/nonexistent/dir is not an existing directory"),
        (str(tmp_path), "it is a directory"),
    ]:
        assert main(["--url", url, "--retries", "0", "generate", "-o", output]) == 1
        err = capsys.readouterr().err
        assert err == f"error: cannot write {output}: {why}\n"
    (tmp_path / "taken-1.png").mkdir()  # with n = 2, one of the two files cannot be written
    output = str(tmp_path / "taken.png")
    assert main(["--url", url, "generate", "-n", "2", "-o", output]) == 1
    assert (
        capsys.readouterr().err
        == f"error: cannot write {tmp_path}/taken-1.png: it is a directory\n"
    )


def test_the_output_suffix_picks_the_format(server, tmp_path, capsys):
    out = tmp_path / "x.npy"
    assert main(["--url", server.url, "generate", "--model", "tiny-dit", "--steps", "2",
                 "--no-progress", "-o", str(out)]) == 0  # fmt: skip
    assert np.load(out).shape == (8, 8, 1)
    out = tmp_path / "x"  # no suffix: --format, else png
    assert main(["--url", server.url, "generate", "--steps", "2", "--format", "webp",
                 "--no-progress", "-o", str(out)]) == 0  # fmt: skip
    assert Image.open(out).format == "WEBP"


def test_class_ids_on_the_openai_endpoint_are_looked_up(mixed_server, tmp_path, capsys):
    """The OpenAI-shaped endpoint takes class names: `id:7` becomes tiny-words' "seven", and
    gives the image the native endpoint gives for class id 7."""
    common = ["--url", mixed_server.url, "generate", "--model", "tiny-words", "--steps", "3",
              "--seed", "8", "--no-progress"]  # fmt: skip
    with_bar = [arg for arg in common if arg != "--no-progress"]
    assert main([*with_bar, "--label", "id:7", "--openai", "-o", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err  # the bar follows OpenAI's partial images
    assert err.splitlines()[-2] == "[" + "#" * 30 + "] 3/3 steps" and "label=seven" in err
    assert main([*common, "--label", "id:7", "-o", str(tmp_path / "b.png")]) == 0
    assert "label=seven" in capsys.readouterr().err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    for label, why in [("id:10", "model 'tiny-words' has class ids 0..9"),
                       ("id:-1", "model 'tiny-words' has class ids 0..9")]:  # fmt: skip
        assert main([*common, "--label", label, "--openai", "-o", str(tmp_path / "c.png")]) == 1
        assert capsys.readouterr().err == f"error: --label {label}: {why}\n"
    assert not (tmp_path / "c.png").exists()


def test_class_ids_of_a_model_without_names(mixed_server, tmp_path, capsys):
    """`tiny-ids` has classes but no names: `id:7` goes to the OpenAI endpoint as "7"."""
    common = ["--url", mixed_server.url, "generate", "--model", "tiny-ids", "--steps", "3",
              "--seed", "8", "--no-progress"]  # fmt: skip
    assert main([*common, "--label", "id:7", "--openai", "-o", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--label", "id:7", "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    capsys.readouterr()
    assert main([*common, "--label", "id:10", "--openai", "-o", str(tmp_path / "c.png")]) == 1
    assert capsys.readouterr().err == "error: --label id:10: model 'tiny-ids' has class ids 0..9\n"


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


def answered(server, status: int) -> int:
    """How many generation requests the server has answered with `status` (its access log)."""
    return server.log.read_text().count(f'"POST /v1/generate HTTP/1.1" {status}')


@pytest.mark.parametrize(
    ("name", "args", "status", "words"),
    [
        ("server", ["--model", "tiny-dit", "--sampler", "bogus"], 422, "(param 'sampler')"),
        ("mixed_server", ["--model", "broken"], 503, "failed to load"),
    ],
)
def test_bench_stops_at_the_first_failed_warm_up_request(
    name, args, status, words, request, tmp_path, capsys
):
    live = request.getfixturevalue(name)
    before = answered(live, status)
    out = tmp_path / "out"
    code = bench_main(["--url", live.url, *args, "--steps", "2", "--concurrency", "1",
                       "--requests", "5", "--no-plots", "--out", str(out)])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert f"error: [A] warm-up request failed: {status} " in err and words in err
    assert answered(live, status) - before == 1  # not the other three warm-up requests
    assert not out.exists()  # nor any measured one


def test_bench_exits_1_on_rejected_requests_or_a_scenario_without_success(
    server, mixed_server, tmp_path, capsys
):
    """Without a warm-up the measured requests meet the same failures: the results are
    written and the exit status says the figures do not stand."""
    out = tmp_path / "rejected"
    code = bench_main(["--url", server.url, "--model", "tiny-dit", "--sampler", "ddim,bogus",
                       "--steps", "2", "--concurrency", "2", "--requests", "8", "--warmup", "0",
                       "--no-plots", "--out", str(out)])  # fmt: skip
    assert code == 1
    overall = json.loads((out / "results.json").read_text())["scenarios"][0]["overall"]
    rejected = overall["errors"]["422"]
    assert overall["ok"] > 0 and overall["ok"] + rejected == 8  # the ddim ones succeeded
    err = capsys.readouterr().err
    assert (
        f"error: [A] closed-c2: the server rejected {rejected} request(s) (422×{rejected})" in err
    )

    out = tmp_path / "unavailable"
    code = bench_main(["--url", mixed_server.url, "--model", "broken", "--steps", "2",
                       "--rate", "50", "--requests", "4", "--warmup", "0", "--no-plots",
                       "--out", str(out)])  # fmt: skip
    assert code == 1 and (out / "results.json").exists()
    assert "error: [A] open-r50: no request succeeded (503×4)" in capsys.readouterr().err
