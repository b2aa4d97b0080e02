"""The zoo's command-line modules: --help only prints, writing needs an explicit flag, bad
arguments are usage errors, and the evaluation reuses a saved row only for the same sample
count and weights. Nothing here trains a model for real or runs the evaluation's grid."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from zoo_fixtures import one_thread  # noqa: F401 (autouse)

from denoised.models.zoo import (
    TEXT_MODELS,
    ZOO_DIR,
    ZOO_MODELS,
    card,
    evaluate,
    evaluate_text,
    hashes,
    judge,
    shapes_judge,
    train,
)
from denoised.models.zoo.judge import FEATURES, frechet_distance

SHIPPED = [
    *(f"{m}/{f}" for m in ZOO_MODELS for f in ("README.md", "samples.png", "model.safetensors")),
    "hashes.json",
    "judge/model.safetensors",
    "judge/config.json",
    "shapes-judge/model.safetensors",
    "shapes-judge/config.json",
]


@pytest.fixture
def shipped_unchanged():
    before = {rel: (ZOO_DIR / rel).read_bytes() for rel in SHIPPED}
    yield
    changed = [rel for rel in SHIPPED if (ZOO_DIR / rel).read_bytes() != before[rel]]
    assert not changed, f"shipped files changed: {changed}"


@pytest.mark.parametrize(
    "module", [hashes, card, judge, train, evaluate, shapes_judge, evaluate_text]
)
def test_help_prints_and_exits_without_writing(module, capsys, shipped_unchanged):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


# --- hashes -----------------------------------------------------------------------------------


def test_hashes_default_is_a_check_that_names_mismatches(tmp_path, capsys, shipped_unchanged):
    assert hashes.main([]) == 0
    record = json.loads(hashes.HASHES_PATH.read_text())
    record["digits-flow/model.safetensors"] = "0" * 64
    del record["judge/model.safetensors"]
    altered = tmp_path / "hashes.json"
    altered.write_text(json.dumps(record))
    capsys.readouterr()
    assert hashes.main(["--hashes", str(altered)]) == 1
    err = capsys.readouterr().err
    assert "digits-flow/model.safetensors: sha256" in err and "judge/model.safetensors" in err
    assert "digits-dit/model.safetensors" not in err
    assert json.loads(altered.read_text()) == record  # a check writes nothing


def test_hashes_write_records_the_current_files(tmp_path):
    out = tmp_path / "hashes.json"
    assert hashes.main(["--write", "--hashes", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(hashes.HASHES_PATH.read_text())


# --- card -------------------------------------------------------------------------------------


def test_shipped_cards_are_what_card_writes(shipped_unchanged):
    assert card.main([]) == 0


def copy_zoo(tmp_path, weights: bool):
    files = ["README.md", "training.json", "config.json", "samples.png"]
    for name in ZOO_MODELS:
        (tmp_path / name).mkdir()
        for f in files + (["model.safetensors"] if weights else []):
            shutil.copy(ZOO_DIR / name / f, tmp_path / name / f)
        if weights and name in TEXT_MODELS:
            shutil.copytree(ZOO_DIR / name / "text", tmp_path / name / "text")
    shutil.copytree(ZOO_DIR / "eval", tmp_path / "eval")
    return tmp_path


def test_card_check_names_a_stale_card(tmp_path, capsys):
    zoo = copy_zoo(tmp_path, weights=False)
    (zoo / "digits-unet" / "README.md").write_text("# digits-unet\n")
    assert card.main(["--zoo-dir", str(zoo)]) == 1
    err = capsys.readouterr().err
    assert "digits-unet/README.md" in err and "digits-dit" not in err
    assert (zoo / "digits-unet" / "README.md").read_text() == "# digits-unet\n"


def test_card_write_reproduces_the_shipped_cards_and_samples(tmp_path):
    zoo = copy_zoo(tmp_path, weights=True)
    for name in ZOO_MODELS:
        (zoo / name / "README.md").unlink()
        (zoo / name / "samples.png").unlink()
    assert card.main(["--write", "--zoo-dir", str(zoo)]) == 0
    for name in ZOO_MODELS:
        assert (zoo / name / "README.md").read_text() == (ZOO_DIR / name / "README.md").read_text()
        new = np.asarray(Image.open(zoo / name / "samples.png"), dtype=np.float64)
        old = np.asarray(Image.open(ZOO_DIR / name / "samples.png"), dtype=np.float64)
        assert new.shape == old.shape
        if name not in TEXT_MODELS:
            assert new.shape == (8 * 8 * 4, 10 * 8 * 4)
        # The same seeded generation: equal up to rounding on another CPU's kernels.
        assert np.abs(new - old).mean() < 1.0, name


# --- judge ------------------------------------------------------------------------------------


def test_judge_without_train_only_reports(capsys, shipped_unchanged):
    judge.main([])
    assert "held-out accuracy 0.98" in capsys.readouterr().out


def test_judge_train_writes_where_asked(tmp_path):
    # One epoch only: this checks the command's plumbing, not the judge's quality.
    judge.main(["--train", "--epochs", "1", "--out", str(tmp_path)])
    info = json.loads((tmp_path / "config.json").read_text())
    assert 0.1 < info["held_out_accuracy"] <= 1.0
    trained = judge.load_judge(tmp_path)
    assert trained.features[1].out_features == FEATURES


# --- argument errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        (train, ["digits-dit", "--steps", "0"], "--steps: must be a positive integer; got 0"),
        (train, ["digits-dit", "--steps", "-5"], "--steps: must be a positive integer; got -5"),
        (train, ["digits-dit", "--threads", "0"], "--threads: must be a positive integer"),
        (train, ["digits-dit", "--snapshot-every", "0"], "--snapshot-every: must be a positive"),
        (train, ["digits-cat"], "unknown recipe(s) digits-cat"),
        (judge, ["--train", "--epochs", "0"], "--epochs: must be a positive integer"),
        (shapes_judge, ["--train", "--scenes", "0"], "--scenes: must be a positive integer"),
        (evaluate_text, ["--prompts", "0"], "--prompts: must be a positive integer"),
        (evaluate_text, ["--models", "digits-dit"], "invalid choice: 'digits-dit'"),
        (evaluate, ["--threads", "0"], "--threads: must be a positive integer"),
        (evaluate, ["--samples", "0"], "--samples: must be a positive integer; got 0"),
        (evaluate, ["--samples", "5"], f"--samples: must be at least {FEATURES + 1}"),
        (evaluate, ["--samples", "ten"], "--samples: must be a positive integer; got 'ten'"),
        (evaluate, ["--nfe", "10", "0"], "--nfe: must be a positive integer; got 0"),
    ],
)
def test_bad_arguments_are_usage_errors(module, argv, message, capsys, shipped_unchanged):
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_recipe_rejects_a_non_positive_step_count(tmp_path):
    for steps in (0, -5):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            train.train_recipe("digits-dit", tmp_path, steps=steps)
    assert not any(tmp_path.iterdir())


def test_frechet_distance_needs_more_samples_than_features():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="more samples than features"):
        frechet_distance(rng.normal(size=(8, 8)), rng.normal(size=(100, 8)))


# --- evaluation cache -------------------------------------------------------------------------

KEY = ("digits-unet", "euler", 5, 1.0)
SAMPLES = evaluate.MIN_SAMPLES  # the cheapest valid row


def saved_row(**fields) -> dict:
    model, sampler, nfe, w = KEY
    row = {
        "model": model, "sampler": sampler, "nfe": nfe, "guidance": w, "evaluations": nfe,
        "samples": SAMPLES, "accuracy": -1.0, "frechet": -1.0, "seconds": 0.0,
    }  # fmt: skip
    return {**row, **fields}


def run_cached(tmp_path, row: dict | None, **kwargs) -> tuple[int, list[dict]]:
    results = tmp_path / "eval"
    results.mkdir(exist_ok=True)
    floor = {"frechet": 4.7, "judge_accuracy": 0.98}
    (results / "digits-unet.json").write_text(json.dumps({"floor": floor, "rows": [row]}))
    reused = evaluate.evaluate([KEY], SAMPLES, results, **kwargs)
    return reused, json.loads((results / "digits-unet.json").read_text())["rows"]


def test_legacy_row_counts_as_computed_from_the_recorded_weights(tmp_path):
    reused, rows = run_cached(tmp_path, saved_row())
    assert reused == 1 and rows == [saved_row()]


def test_row_with_the_current_hashes_is_reused(tmp_path):
    row = saved_row(**evaluate.weight_hashes("digits-unet"))
    assert run_cached(tmp_path, row) == (1, [row])


def recomputed(rows: list[dict]) -> dict:
    assert len(rows) == 1, "the old row must be replaced, not kept beside the new one"
    (row,) = rows
    assert evaluate.row_key(row) == KEY and row["samples"] == SAMPLES
    assert row["frechet"] > 0 and 0 <= row["accuracy"] <= 1
    assert {k: row[k] for k in ("model_sha256", "judge_sha256")} == evaluate.weight_hashes(
        "digits-unet"
    )
    return row


@pytest.mark.parametrize(
    "change",
    [
        {"samples": 1000},  # a full run does not reuse a smaller one, nor the reverse
        {"model_sha256": "0" * 64},  # retrained model
        {"judge_sha256": "0" * 64},  # retrained judge
    ],
)
def test_row_with_other_samples_or_weights_is_recomputed(tmp_path, change):
    reused, rows = run_cached(tmp_path, saved_row(**change))
    assert reused == 0
    recomputed(rows)


def test_legacy_row_is_recomputed_after_retraining(tmp_path):
    # hashes.json as it would read before the current weights were recorded.
    record = json.loads(hashes.HASHES_PATH.read_text())
    record["digits-unet/model.safetensors"] = "0" * 64
    old_record = tmp_path / "hashes.json"
    old_record.write_text(json.dumps(record))
    reused, rows = run_cached(tmp_path, saved_row(), hashes_path=old_record)
    assert reused == 0
    recomputed(rows)


def test_recompute_ignores_a_matching_row(tmp_path):
    reused, rows = run_cached(tmp_path, saved_row(), recompute=True)
    assert reused == 0
    recomputed(rows)


def test_main_reports_reused_rows(tmp_path, capsys, shipped_unchanged):
    results = tmp_path / "eval"
    results.mkdir()
    floor = {"frechet": 4.7, "judge_accuracy": 0.98}
    (results / "digits-unet.json").write_text(json.dumps({"floor": floor, "rows": [saved_row()]}))
    argv = ["--models", "digits-unet", "--samplers", "euler", "--nfe", "5", "--guidance", "1"]
    doc = tmp_path / "zoo.md"
    doc.write_text(f"{evaluate.BEGIN}\n{evaluate.END}\n")
    evaluate.main([*argv, "--samples", str(SAMPLES), "--results", str(results), "--doc", str(doc)])
    out, err = capsys.readouterr()
    assert "reused 1 cached rows" in out and "--recompute" in out
    assert f"warning: {SAMPLES} samples per row" in err
    assert "| digits-unet | euler | 5 | 5 | 1 | -100.0 % | -1.00 | 0.0 |" in doc.read_text()


def test_doc_table_is_the_shipped_results():
    text = evaluate.DOC_PATH.read_text()
    section = text.split(evaluate.BEGIN)[1].split(evaluate.END)[0]
    assert section.strip() == evaluate.render_table(evaluate.load_results())


def test_text_doc_table_is_the_shipped_results():
    text = evaluate.DOC_PATH.read_text()
    section = text.split(evaluate_text.BEGIN)[1].split(evaluate_text.END)[0]
    assert section.strip() == evaluate_text.render_table(evaluate_text.load_text_results())


def test_shapes_judge_without_train_only_reports(capsys, shipped_unchanged):
    shapes_judge.main([])
    out = capsys.readouterr().out
    read = dict(re.findall(r"(\w+) (\d\.\d{4})", out.split("held-out accuracy")[1]))
    assert set(read) == set(shapes_judge.ATTRIBUTES), out
    assert min(float(v) for v in read.values()) >= 0.95, out


def test_text_evaluation_writes_a_row_and_the_doc_table(tmp_path, shipped_unchanged):
    doc = tmp_path / "zoo.md"
    doc.write_text(f"intro\n{evaluate_text.BEGIN}\nold\n{evaluate_text.END}\n")
    argv = ["--samplers", "euler", "--nfe", "2", "--guidance", "3", "--prompts", "4"]
    evaluate_text.main([*argv, "--results", str(tmp_path / "text"), "--doc", str(doc)])
    (row,) = json.loads((tmp_path / "text" / "shapes-text.json").read_text())["rows"]
    assert evaluate_text.row_key(row) == ("shapes-text", "euler", 2, 3.0)
    assert row["evaluations"] == 2 and row["prompts"] == 4 and 0 <= row["all"] <= 1
    assert "| euler | 2 | 2 | 3 |" in doc.read_text() and "old" not in doc.read_text()
