"""Prompts → text-encoder hidden states, equal to diffusers' `encode_prompt`.

Two pipelines' schemes:
* `StableDiffusionPipeline` (Rombach et al., 2022; SD1 and SD2): one CLIP text encoder's
  last hidden state over the prompt padded to the tokenizer's `model_max_length` (77).
* `StableDiffusion3Pipeline` (Esser et al., 2024): CLIP-L's and CLIP-G's penultimate hidden
  states concatenated on the feature axis and zero-padded to T5's width, followed on the
  sequence axis by T5-XXL's hidden states over `max_sequence_length` tokens (zeros of the
  transformer's `joint_attention_dim` for a pipeline without T5); the pooled embedding is
  the two CLIP projections concatenated.

Every prompt is padded to the full length without an attention mask, as in diffusers, so each
prompt's encoding does not depend on the others in its batch. The unconditional branch of
classifier-free guidance is the empty prompt `""` in both pipelines (their
`negative_prompt=None`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase as Tokenizer

from denoised.models.checkpoints.model_dir import read_json_object
from denoised.models.text.cache import PromptCache
from denoised.models.text.loading import (
    CLIP_TOKENIZERS,
    T5_TOKENIZERS,
    TextPart,
    load_text_pair,
    load_tokenizer,
    read_model_index,
    text_part_classes,
)
from denoised.models.text.prompts import EncodedPrompt

MAX_T5_SEQUENCE_LENGTH = 512  # the bound StableDiffusion3Pipeline accepts


def tokenize(tokenizer: Tokenizer, prompts: list[str], max_length: int, device: torch.device):
    """`input_ids` and `attention_mask` [B, max_length] on `device`, truncated and padded as
    diffusers does."""
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).to(device)


class TextConditioner(ABC):
    """A pipeline's text encoders with their tokenizers. `max_tokens` is the prompt limit, in
    the tokens of `counting_tokenizer`: the encoder that reads the most of a prompt."""

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        counting_tokenizer: Tokenizer,
        max_tokens: int,
    ):
        self.device, self.dtype = device, dtype
        self.counting_tokenizer = counting_tokenizer
        self.max_tokens = max_tokens

    @staticmethod
    def from_pipeline_dir(
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 256,
        token_width: int | None = None,
    ) -> TextConditioner:
        """The text encoders of the diffusers pipeline folder `path`, on `device` in `dtype`.
        `max_sequence_length`: T5's tokens for SD3 (diffusers' default 256); `token_width`: the
        width of the zeros an SD3 pipeline without T5 feeds (default: the folder's
        `transformer/config.json` `joint_attention_dim`). ValueError, naming
        the file or folder, for an unsupported pipeline, a missing tokenizer or encoder, or
        encoder weights that are pickled only or do not match their config."""
        path = Path(path)
        index = read_model_index(path)
        load = pipeline_text_class(path, index).load
        return load(path, index, torch.device(device), dtype, max_sequence_length, token_width)

    def encode(
        self, prompts: Sequence[str], cache: PromptCache | None = None
    ) -> list[EncodedPrompt]:
        """One `EncodedPrompt` per prompt. The distinct prompts `cache` does not hold are
        encoded together, one call per encoder, and put into it."""
        distinct = list(dict.fromkeys(prompts))
        cached = {p: cache.get(p) for p in distinct} if cache is not None else {}
        found = {p: encoded for p, encoded in cached.items() if encoded is not None}
        new = [p for p in distinct if p not in found]
        if new:
            with torch.inference_mode():
                tokens, pooled = self._encode(new)
            counts = [len(ids) for ids in self.counting_tokenizer(new).input_ids]
            for i, (prompt, n) in enumerate(zip(new, counts, strict=True)):
                found[prompt] = EncodedPrompt(
                    tokens=tokens[i].clone(),
                    pooled=None if pooled is None else pooled[i].clone(),
                    num_tokens=n,
                    truncated=n > self.max_tokens,
                )
                if cache is not None:
                    cache.put(prompt, found[prompt])
        return [found[p] for p in prompts]

    @abstractmethod
    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        """[B, L, D] hidden states and [B, P] pooled embeddings (or None) of `prompts`."""


class StableDiffusionText(TextConditioner):
    """`StableDiffusionPipeline.encode_prompt` without clip_skip: CLIP's last hidden state."""

    PARTS = (TextPart("", CLIP_TOKENIZERS, ("CLIPTextModel",)),)

    def __init__(
        self, tokenizer: Tokenizer, encoder: nn.Module, device: torch.device, dtype: torch.dtype
    ):
        super().__init__(device, dtype, tokenizer, tokenizer.model_max_length)
        self.tokenizer, self.encoder = tokenizer, encoder
        # Some converted checkpoints ask for the padding mask; diffusers passes it to them.
        self.use_mask = bool(getattr(encoder.config, "use_attention_mask", False))

    @classmethod
    def load(
        cls, path, index, device, dtype, max_sequence_length, token_width
    ) -> StableDiffusionText:
        pair = load_text_pair(path, index, cls.PARTS[0], device, dtype)
        assert pair is not None  # a required part loads or raises
        return cls(*pair, device, dtype)

    def _encode(self, prompts: list[str]) -> tuple[Tensor, None]:
        inputs = tokenize(self.tokenizer, prompts, self.max_tokens, self.device)
        mask = inputs.attention_mask if self.use_mask else None
        return self.encoder(inputs.input_ids, attention_mask=mask)[0], None


class StableDiffusion3Text(TextConditioner):
    """`StableDiffusion3Pipeline.encode_prompt` with one prompt for all three encoders and
    without clip_skip."""

    PARTS = (
        *(
            TextPart(suffix, CLIP_TOKENIZERS, ("CLIPTextModelWithProjection",))
            for suffix in ("", "_2")
        ),
        TextPart("_3", T5_TOKENIZERS, ("T5EncoderModel",), required=False),
    )

    def __init__(
        self,
        clip: list[tuple[Tokenizer, nn.Module]],
        t5: tuple[Tokenizer, nn.Module] | None,
        max_sequence_length: int,
        zeros_width: int | None,
        device: torch.device,
        dtype: torch.dtype,
    ):
        # Both CLIP tokenizers pad to the first one's length, as in diffusers.
        self.clip_length = clip[0][0].model_max_length
        counting = (
            (t5[0], max_sequence_length)
            if t5 is not None and max_sequence_length > self.clip_length
            else (clip[0][0], self.clip_length)
        )
        super().__init__(device, dtype, *counting)
        self.clip, self.t5 = clip, t5
        self.max_sequence_length, self.zeros_width = max_sequence_length, zeros_width

    @classmethod
    def load(
        cls, path, index, device, dtype, max_sequence_length, token_width
    ) -> StableDiffusion3Text:
        if not 1 <= max_sequence_length <= MAX_T5_SEQUENCE_LENGTH:
            raise ValueError(
                f"max_sequence_length must be in 1..{MAX_T5_SEQUENCE_LENGTH}, "
                f"got {max_sequence_length}"
            )
        *parts, t5 = (load_text_pair(path, index, part, device, dtype) for part in cls.PARTS)
        clip = [pair for pair in parts if pair is not None]  # required: loaded or raised
        zeros_width = token_width
        if t5 is None and zeros_width is None:  # zeros as wide as the transformer's text input
            config = path / "transformer" / "config.json"
            zeros_width = read_json_object(config).get("joint_attention_dim")
            if not isinstance(zeros_width, int):
                raise ValueError(f"{config} lacks joint_attention_dim (the pipeline has no T5)")
        return cls(clip, t5, max_sequence_length, zeros_width, device, dtype)

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        hidden, pooled = [], []
        for tokenizer, encoder in self.clip:
            ids = tokenize(tokenizer, prompts, self.clip_length, self.device).input_ids
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        if self.t5 is None:
            # `load` sets zeros_width whenever the pipeline has no T5.
            assert self.zeros_width is not None
            t5 = torch.zeros(
                len(prompts),
                self.max_sequence_length,
                self.zeros_width,
                dtype=self.dtype,
                device=self.device,
            )
        else:
            tokenizer, encoder = self.t5
            ids = tokenize(tokenizer, prompts, self.max_sequence_length, self.device).input_ids
            t5 = encoder(ids)[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


PIPELINES: dict[str, type[StableDiffusionText | StableDiffusion3Text]] = {
    "StableDiffusionPipeline": StableDiffusionText,
    "StableDiffusion3Pipeline": StableDiffusion3Text,
}


def pipeline_text_class(
    path: Path, index: dict
) -> type[StableDiffusionText | StableDiffusion3Text]:
    """The encoding scheme of the pipeline whose `model_index.json` is `index`; ValueError for
    a pipeline class other than those of PIPELINES."""
    kind = index.get("_class_name")
    if kind not in PIPELINES:
        raise ValueError(
            f"{path / 'model_index.json'}: {kind!r} pipelines are not supported; "
            f"supported: {', '.join(PIPELINES)}"
        )
    return PIPELINES[kind]


def check_pipeline_text(path: str | os.PathLike) -> None:
    """What `TextConditioner.from_pipeline_dir` refuses before it reads an encoder's weights
    (the pipeline and component classes, missing tokenizers and encoders, pickled-only
    weights), without loading any encoder: ValueError naming the file or folder. Tokenizers
    are small and are loaded."""
    path = Path(path)
    index = read_model_index(path)
    for part in pipeline_text_class(path, index).PARTS:
        classes = text_part_classes(path, index, part)
        if classes is not None:
            load_tokenizer(path, "tokenizer" + part.suffix, classes[0])
