"""The shipped text-to-image zoo model: it loads through the users' loader with its CLIP text
encoder and word-level tokenizer, what it draws for a few full-attribute prompts is read back
by the shapes judge (and an untrained backbone's is not), and the recipe trains the text
encoder jointly with the backbone."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from zoo_fixtures import one_thread  # noqa: F401 (autouse)

from denoised.models.checkpoints.model_dir import build_backbone, load_model_dir
from denoised.models.sampling.process import process_from_config
from denoised.models.text.word_tokenizer import apply_merges
from denoised.models.zoo import ZOO_DIR
from denoised.models.zoo.evaluate_text import adherence, adherence_prompts, generate_from_prompts
from denoised.models.zoo.shapes import make_dataset
from denoised.models.zoo.shapes_judge import (
    SHAPES_JUDGE_DIR,
    held_out_accuracy,
    load_shapes_judge,
    to_model_range,
)
from denoised.models.zoo.shapes_text import (
    WORDS,
    TextToImage,
    build_text_encoder,
    token_ids,
    write_tokenizer,
)
from denoised.models.zoo.train import TrainSettings, load_recipes, train

NAME = "shapes-text"
PROMPTS = 16
# 16 full-attribute prompts, Euler, 10 steps, the default guidance (3), seed 0. Measured over
# seeds 0-3: the shipped model reads 100 % of single objects' colours right and 81-88 % of
# images right on every attribute; an untrained backbone 0 % and 0 %.
MIN_COLOUR, MIN_ALL = 0.9, 0.6


@pytest.fixture(scope="module")
def model():
    return load_model_dir(ZOO_DIR / NAME)


def test_loads_with_the_users_loader(model):
    recipe = load_recipes()[NAME]
    assert model.name == NAME and model.text is not None and model.class_names is None
    assert model.latent_shape == (3, 32, 32) and model.guided_channels == 3
    assert model.text_dims == (recipe["architecture"]["cross_attention_dim"], None)
    assert model.text.max_tokens == recipe["data"]["max_tokens"]
    assert all(p.dtype == torch.float32 for p in model.backbone.parameters())
    index = json.loads((ZOO_DIR / NAME / "text" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    tokenizer_dir = ZOO_DIR / NAME / "text" / "tokenizer"
    assert {p.name for p in tokenizer_dir.iterdir()} == {
        "vocab.json", "merges.txt", "tokenizer_config.json",
    }  # fmt: skip


def test_every_caption_word_is_one_token(model):
    tokenizer = model.text.tokenizer
    for word in WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    # Other words fall back to characters, as CLIP's byte-pair encoding gives them.
    assert tokenizer.tokenize("pink") == ["p", "i", "n", "k</w>"]


def test_merges_are_applied_as_clip_applies_them(tmp_path):
    tokenizer = write_tokenizer(tmp_path, 16)
    merges = [
        tuple(line.split()) for line in (tmp_path / "merges.txt").read_text().split("\n")[1:-1]
    ]
    for word in ["green", "red", "right", "triangle", "rectangle", "bottom", "tot"]:
        assert apply_merges(word, merges) == tokenizer.tokenize(word), word


def follows_prompts(model, judge) -> bool:
    texts, scenes = adherence_prompts(PROMPTS)
    guidance = model.config["defaults"]["guidance_scale"]
    x, _ = generate_from_prompts(model, texts, "euler", 10, guidance)
    result = adherence(judge, x, scenes)
    return result["colour"] >= MIN_COLOUR and result["all"] >= MIN_ALL


def test_short_generation_follows_the_prompts(model):
    assert follows_prompts(model, load_shapes_judge())


def test_untrained_backbone_fails_the_same_check(model):
    recipe = load_recipes()[NAME]
    torch.manual_seed(0)
    backbone = build_backbone(recipe["family"], recipe["architecture"]).eval()
    assert not follows_prompts(replace(model, backbone=backbone), load_shapes_judge())


def test_shipped_judge_reads_held_out_scenes():
    accuracy = held_out_accuracy(load_shapes_judge(SHAPES_JUDGE_DIR))
    assert min(accuracy.values()) >= 0.95, accuracy


def test_text_encoder_is_trained_jointly_and_seeded(tmp_path):
    recipe = load_recipes()[NAME]
    tokenizer = write_tokenizer(tmp_path, recipe["data"]["max_tokens"])
    images, captions, _ = make_dataset(16, seed=0)
    settings = TrainSettings(**{**recipe["train"], "steps": 2, "batch_size": 4})

    def run(seed: int) -> dict:
        torch.manual_seed(0)
        encoder = build_text_encoder(tokenizer, recipe["text_encoder"])
        backbone = build_backbone(recipe["family"], recipe["architecture"])
        model = TextToImage(encoder, backbone)
        before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
        result = train(
            model, process_from_config(recipe["process"]), to_model_range(images),
            token_ids(tokenizer, captions), token_ids(tokenizer, [""])[0],
            replace(settings, seed=seed), log=lambda _: None,
        )  # fmt: skip
        moved = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, before[k])]
        assert "embeddings.token_embedding.weight" in moved
        return result.ema.state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
