"""Prompt encoding against diffusers' own `encode_prompt` (StableDiffusionPipeline and
StableDiffusion3Pipeline, tiny random components read from the same pipeline folder), and
the refusals of folders that do not load."""

import shutil

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from text_fixtures import (
    CLIP_MAX_LENGTH,
    T5_MAX_LENGTH,
    T5_WIDTH,
    sd3_pipeline,
    sd_pipeline,
    write_clip_tokenizer,
    write_released_clip_layout,
)

from denoised.models.text.conditioner import TextConditioner

LONG = "the astronaut on a red sky, a photo of a blue dog on the sky of a red cat on a dog, a cat"
PROMPTS = ["a photo of a cat", "", LONG, "The ASTRONAUT, on a red sky!", "zzz qq"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "pipe"
    sd_pipeline().save_pretrained(path, safe_serialization=True)
    # The released SD folders' layout: tokenizer files vocab.json + merges.txt without a
    # tokenizer.json, encoder weights under transformers 4's names.
    shutil.rmtree(path / "tokenizer")
    write_clip_tokenizer(path / "tokenizer")
    write_released_clip_layout(path / "text_encoder")
    return path


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "pipe"
    sd3_pipeline().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def sd3_no_t5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3-no-t5") / "pipe"
    sd3_pipeline(t5=False).save_pretrained(path, safe_serialization=True)
    return path


def assert_close(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0.1
    assert (ours - ref).abs().max().item() <= 1e-6 * scale


def test_stable_diffusion_matches_diffusers(sd_dir):
    ref = StableDiffusionPipeline.from_pretrained(sd_dir)
    cond, uncond = ref.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=True)
    ours = TextConditioner.from_pipeline_dir(sd_dir)
    encoded = ours.encode(PROMPTS)
    assert_close(torch.stack([e.tokens for e in encoded]), cond)
    assert all(e.pooled is None for e in encoded)
    # The unconditional branch is the empty prompt, padded to the full length like any other.
    assert_close(ours.encode([""])[0].tokens, uncond[0])
    assert cond.shape[1] == CLIP_MAX_LENGTH
    assert not torch.allclose(cond[0], cond[1], atol=1e-2)


def sd3_reference(path, prompts, t5: bool):
    # diffusers loads a pipeline without T5 only when told so.
    absent = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    ref = StableDiffusion3Pipeline.from_pretrained(path, **absent)
    return ref.encode_prompt(
        prompts,
        None,
        None,
        device="cpu",
        do_classifier_free_guidance=True,
        max_sequence_length=T5_MAX_LENGTH,
    )


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
def test_stable_diffusion_3_matches_diffusers(sd3_dir, sd3_no_t5_dir, t5):
    path = sd3_dir if t5 else sd3_no_t5_dir
    cond, uncond, pooled, uncond_pooled = sd3_reference(path, PROMPTS, t5)
    ours = TextConditioner.from_pipeline_dir(path, max_sequence_length=T5_MAX_LENGTH)
    encoded = ours.encode(PROMPTS)
    tokens = torch.stack([e.tokens for e in encoded])
    assert tokens.shape == (len(PROMPTS), CLIP_MAX_LENGTH + T5_MAX_LENGTH, T5_WIDTH)
    assert_close(tokens, cond)
    assert_close(torch.stack([e.pooled for e in encoded]), pooled)
    (empty,) = ours.encode([""])
    assert_close(empty.tokens, uncond[0])
    assert_close(empty.pooled, uncond_pooled[0])
    t5_part = tokens[:, CLIP_MAX_LENGTH:]
    assert (t5_part.abs().amax() > 0.1) if t5 else (t5_part == 0).all()


def test_truncation_is_reported(sd_dir, sd3_dir, sd3_no_t5_dir):
    sd = TextConditioner.from_pipeline_dir(sd_dir)
    assert sd.max_tokens == CLIP_MAX_LENGTH
    counts = [(e.num_tokens, e.truncated) for e in sd.encode(["a cat", "", LONG])]
    clip_long = len(sd.tokenizer(LONG).input_ids)
    assert clip_long > CLIP_MAX_LENGTH
    assert counts == [(4, False), (2, False), (clip_long, True)]  # <|startoftext|> … <|endoftext|>

    # SD3 reads T5's longer sequence: a prompt past CLIP's 16 tokens but within T5's 24 is
    # not truncated (CLIP reads its first 16 tokens, as in diffusers).
    sd3 = TextConditioner.from_pipeline_dir(sd3_dir, max_sequence_length=T5_MAX_LENGTH)
    assert sd3.max_tokens == T5_MAX_LENGTH
    medium = "a photo of the cat on a red dog on the blue sky of a cat"
    t5_counts = [len(sd3.t5[0](p).input_ids) for p in (medium, LONG)]
    assert len(sd.tokenizer(medium).input_ids) > CLIP_MAX_LENGTH
    assert t5_counts[0] <= T5_MAX_LENGTH
    assert t5_counts[1] > T5_MAX_LENGTH
    encoded = sd3.encode([medium, LONG, ""])
    assert [(e.num_tokens, e.truncated) for e in encoded] == [
        (t5_counts[0], False),
        (t5_counts[1], True),
        (1, False),  # </s>
    ]
    no_t5 = TextConditioner.from_pipeline_dir(sd3_no_t5_dir, max_sequence_length=T5_MAX_LENGTH)
    assert no_t5.max_tokens == CLIP_MAX_LENGTH
    assert no_t5.encode([medium])[0].truncated


def test_dtype_and_bound_of_max_sequence_length(sd3_no_t5_dir):
    ours = TextConditioner.from_pipeline_dir(sd3_no_t5_dir, dtype=torch.bfloat16)
    (encoded,) = ours.encode(["a cat"])
    assert encoded.tokens.dtype == encoded.pooled.dtype == torch.bfloat16
    assert encoded.tokens.shape == (CLIP_MAX_LENGTH + 256, T5_WIDTH)  # diffusers' default
    with pytest.raises(ValueError, match=r"max_sequence_length must be in 1\.\.512"):
        TextConditioner.from_pipeline_dir(sd3_no_t5_dir, max_sequence_length=513)


def copy_pipeline(src, tmp_path):
    return shutil.copytree(src, tmp_path / "pipe")


def test_pickled_weights_are_refused(sd_dir, tmp_path):
    path = copy_pipeline(sd_dir, tmp_path)
    (path / "text_encoder" / "model.safetensors").unlink()
    (path / "text_encoder" / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError) as e:
        TextConditioner.from_pipeline_dir(path)
    message = str(e.value)
    assert "\n" not in message
    assert str(path / "text_encoder" / "pytorch_model.bin") in message
    assert "convert it to safetensors" in message


@pytest.mark.parametrize("folder", ["tokenizer_2", "text_encoder_3"])
def test_missing_folder_is_refused(sd3_dir, tmp_path, folder):
    path = copy_pipeline(sd3_dir, tmp_path)
    shutil.rmtree(path / folder)
    with pytest.raises(ValueError, match=rf"{path / folder} is missing"):
        TextConditioner.from_pipeline_dir(path)


@pytest.mark.parametrize("change", ["missing", "mismatched"])
def test_weights_that_leave_parameters_unset_are_refused(sd_dir, tmp_path, change):
    path = copy_pipeline(sd_dir, tmp_path)
    file = path / "text_encoder" / "model.safetensors"
    state = load_file(file)
    key = "text_model.final_layer_norm.weight"
    if change == "missing":
        del state[key]
        expected = r"missing keys: .*final_layer_norm\.weight"
    else:
        state[key] = state[key][:-1]
        expected = r"shape mismatches: .*final_layer_norm\.weight: file \(31,\), config \(32,\)"
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=expected):
        TextConditioner.from_pipeline_dir(path)


def test_unsupported_components_are_refused(sd_dir, tmp_path):
    path = copy_pipeline(sd_dir, tmp_path)
    index = (path / "model_index.json").read_text()
    (path / "model_index.json").write_text(index.replace('"CLIPTextModel"', '"BertModel"'))
    with pytest.raises(ValueError, match="text_encoder is a BertModel; supported: CLIPTextModel"):
        TextConditioner.from_pipeline_dir(path)
    (path / "model_index.json").write_text(index.replace("StableDiffusionPipeline", "DDPMPipeline"))
    with pytest.raises(ValueError, match="'DDPMPipeline' pipelines are not supported"):
        TextConditioner.from_pipeline_dir(path)
