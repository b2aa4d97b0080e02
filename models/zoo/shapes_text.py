"""The text side of the shapes text-to-image model: its word-level CLIP tokenizer, its small
CLIP text encoder, and the two trained together with the backbone.

The model is served in the layout of a diffusers `StableDiffusionPipeline` (Rombach et al.,
2022): one `CLIPTextModel` whose last hidden state over the prompt, padded to the tokenizer's
`model_max_length` without a mask, is the backbone's cross-attention input. Training encodes
captions the same way (`StableDiffusionText` in `models/text/conditioner.py`), so what the
backbone learned from is exactly what serving feeds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from denoised.models.conditioning import TextContext
from denoised.models.text.word_tokenizer import write_clip_word_tokenizer
from denoised.models.zoo.shapes import COLOURS, RELATIONS, SHAPES, SIZES

# Every word a caption can hold (shapes.caption), one token each.
WORDS = (
    "a", "on", "the", "at", "to", "of", "left", "right", "top", "bottom", "above", "below",
    *COLOURS, *SHAPES, *SIZES,
)  # fmt: skip
assert {w for r in RELATIONS for w in r.split()} <= set(WORDS)


def write_tokenizer(path: Path, max_length: int) -> CLIPTokenizer:
    return write_clip_word_tokenizer(path, WORDS, max_length)


def build_text_encoder(tokenizer: CLIPTokenizer, settings: dict) -> CLIPTextModel:
    """A `CLIPTextModel` over `tokenizer`'s vocabulary; `settings` are `CLIPTextConfig`
    arguments (hidden_size, num_hidden_layers, ...), `max_position_embeddings` the tokenizer's
    length."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    return CLIPTextModel(config)


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """[N, model_max_length] ids, padded and truncated as serving does."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip


class TextToImage(nn.Module):
    """The text encoder and the backbone as one trainable module: token ids in, the
    backbone's prediction out."""

    def __init__(self, encoder: CLIPTextModel, backbone: nn.Module):
        super().__init__()
        self.encoder, self.backbone = encoder, backbone

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone(x, t, TextContext(self.encoder(ids).last_hidden_state))


def write_pipeline_text(path: Path, encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> Path:
    """A `StableDiffusionPipeline` folder's text parts (model_index.json, text_encoder/ in
    safetensors, tokenizer/): what `save_model_dir(..., text_from=path)` copies."""
    encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    tokenizer_dir = path / "tokenizer"
    write_tokenizer(tokenizer_dir, tokenizer.model_max_length)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
