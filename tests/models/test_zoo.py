"""The shipped zoo: files unchanged, models load through the users' loader, and a short fixed-
seed generation from each is recognised by the judge; the data split and the Fréchet distance
the evaluation rests on."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from zoo_fixtures import one_thread  # noqa: F401 (autouse)

from denoised.models.checkpoints.model_dir import build_backbone, load_model_dir
from denoised.models.sampling.process import process_from_config
from denoised.models.sampling.samplers import SAMPLER_NAMES, create_sampler
from denoised.models.zoo import CLASS_MODELS, ZOO_DIR
from denoised.models.zoo.data import CLASS_NAMES, load_digits_split
from denoised.models.zoo.evaluate import BEGIN, END, NFES, generate, sampler_steps, write_doc
from denoised.models.zoo.hashes import HASHES_PATH, file_hashes
from denoised.models.zoo.judge import frechet_distance, judge_images, load_judge
from denoised.models.zoo.train import TrainSettings, load_recipes, native_time_at_log_snr, train

# 16 samples (labels 0..9, 0..5), DPM-Solver++(2M), 10 steps, guidance 2, seed 0. Measured
# over seeds 0-3: the shipped models score 15 or 16 of 16, an untrained DiT 0 to 2 of 16.
MIN_SHORT_ACCURACY = 13 / 16


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_recorded_hashes_match_the_shipped_files():
    assert file_hashes() == json.loads(HASHES_PATH.read_text())


@pytest.mark.parametrize("name", CLASS_MODELS)
def test_model_loads_with_the_users_loader(name):
    model = load_model_dir(ZOO_DIR / name)
    assert model.name == name
    assert model.class_names == CLASS_NAMES and model.num_classes == 10
    assert model.latent_shape == (1, 8, 8) and model.guided_channels == 1
    assert all(p.dtype == torch.float32 for p in model.backbone.parameters())
    assert (
        model.process.to_config()
        == process_from_config(load_recipes()[name]["process"]).to_config()
    )


@pytest.mark.parametrize("name", CLASS_MODELS)
def test_short_generation_is_recognised(name, judge):
    x, labels, _ = generate(load_model_dir(ZOO_DIR / name), "dpmpp-2m", 10, 2.0, 16, seed=0)
    _, pred = judge_images(judge, x)
    accuracy = (pred == labels).float().mean().item()
    assert accuracy >= MIN_SHORT_ACCURACY, f"{name}: {accuracy:.3f}"


def test_untrained_backbone_fails_the_same_check(judge):
    recipe = load_recipes()["digits-dit"]
    model = load_model_dir(ZOO_DIR / "digits-dit")
    torch.manual_seed(0)
    model.backbone = build_backbone(recipe["family"], recipe["architecture"]).eval()
    x, labels, _ = generate(model, "dpmpp-2m", 10, 2.0, 16, seed=0)
    _, pred = judge_images(judge, x)
    assert (pred == labels).float().mean().item() < MIN_SHORT_ACCURACY


def test_split_is_fixed_disjoint_and_stratified():
    split = load_digits_split()
    assert split.train_x.shape == (1433, 1, 8, 8) and split.held_out_x.shape == (364, 1, 8, 8)
    assert split.train_x.min() == -1 and split.train_x.max() == 1
    assert split.held_out_y.bincount().tolist() == [36, 37, 36, 37, 37, 37, 37, 36, 35, 36]
    train = {tuple(r) for r in split.train_x.flatten(1).tolist()}
    assert not any(tuple(r) in train for r in split.held_out_x.flatten(1).tolist())


def test_judge_recognises_held_out_digits(judge):
    split = load_digits_split()
    _, pred = judge_images(judge, split.held_out_x)
    assert (pred == split.held_out_y).float().mean().item() >= 0.97


def test_frechet_distance_matches_an_eigenvalue_formula():
    # Reference: Tr((Σa Σb)^½) = Σ √eig(Σa^½ Σb Σa^½), computed with symmetric eigensolvers.
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 1.0
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) - 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(w)) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cb @ root_a), 0, None)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["digits-dit", "digits-flow"])
def test_log_snr_time_map_inverts_the_process(name):
    process = process_from_config(load_recipes()[name]["process"])
    # Inside the VP schedule's λ range (about −5.1 at τ = 999 to 4.6 at τ = 0).
    log_snr = torch.linspace(-4.5, 4.5, 23, dtype=torch.float64)
    t = native_time_at_log_snr(process, log_snr)
    alpha, sigma = process.alpha_sigma(t.double().numpy())
    np.testing.assert_allclose(np.log(alpha / sigma), log_snr.numpy(), atol=1e-4)


def test_log_snr_beyond_the_vp_schedule_clamps_to_its_ends():
    process = process_from_config(load_recipes()["digits-dit"]["process"])
    t = native_time_at_log_snr(process, torch.tensor([-9.0, 9.0]))
    assert t.tolist() == [999.0, 0.0]


def test_training_is_seeded():
    recipe = load_recipes()["digits-dit"]
    settings = TrainSettings(**{**recipe["train"], "steps": 3, "batch_size": 8})
    split = load_digits_split()

    def run(seed: int) -> dict:
        torch.manual_seed(0)
        backbone = build_backbone(recipe["family"], recipe["architecture"])
        result = train(
            backbone, process_from_config(recipe["process"]), split.train_x, split.train_y,
            torch.tensor(10), replace(settings, seed=seed), log=lambda _: None,
        )  # fmt: skip
        assert [step for step, _, _ in result.losses] == [3]
        return result.ema.state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("nfe", NFES)
def test_every_sampler_spends_at_most_the_rows_nfe(nfe):
    process = process_from_config(load_recipes()["digits-dit"]["process"])
    for sampler in SAMPLER_NAMES:
        state = create_sampler(
            sampler, process, sampler_steps(sampler, nfe), (1, 1, 8, 8), torch.Generator()
        )
        assert nfe - 1 <= state.nfe <= nfe, sampler


def test_doc_table_replaces_only_the_marked_section(tmp_path):
    row = {
        "model": "digits-flow", "sampler": "euler", "nfe": 10, "guidance": 2.0, "evaluations": 10,
        "samples": 1000, "accuracy": 0.987, "frechet": 12.345, "seconds": 3.0,
    }  # fmt: skip
    results = {"floor": {"frechet": 4.5, "judge_accuracy": 0.98}, "rows": [row]}
    doc = tmp_path / "zoo.md"
    doc.write_text(f"intro\n{BEGIN}\nold table\n{END}\noutro\n")
    write_doc(results, doc)
    text = doc.read_text()
    assert text.startswith(f"intro\n{BEGIN}\n") and text.endswith(f"{END}\noutro\n")
    assert "old table" not in text
    assert "| digits-flow | euler | 10 | 10 | 2 | 98.7 % | 12.35 | 3.0 |" in text
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        write_doc(results, doc)
