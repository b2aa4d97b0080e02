"""Tiny text encoders and tokenizers with random weights, written without hub access, and the
tiny Stable Diffusion / SD3 pipelines around them (diffusers' own classes, random weights).

`sd_pipeline()` / `sd3_pipeline()` return diffusers pipelines with every parameter random
(none zero-initialised); `pipe.save_pretrained(path)` writes a pipeline folder (safetensors)
with `model_index.json`, the text parts and the rest. Folders written by transformers 5 hold
its names (`CLIPTextModel` without the `text_model.` prefix) and a `tokenizer.json`;
`write_released_clip_layout` and `write_clip_tokenizer` give the released SD folders' layout.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers_reference import SD3_VAE, TINY_VAE
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from denoised.models.text.word_tokenizer import write_clip_word_tokenizer

CLIP_MAX_LENGTH = 16  # the tokenizers' model_max_length (77 in the released models)
T5_MAX_LENGTH = 24  # the SD3 pipelines' max_sequence_length in the tests (256 by default)
CLIP_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 32, 48, 40
WORDS = ("a", "the", "cat", "dog", "photo", "of", "on", "red", "blue", "sky", "astronaut")


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Every parameter drawn anew (LayerNorm weights around 1), so that no zero- or
    one-initialised tensor hides a wiring mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
    return module.eval()


def write_clip_tokenizer(path: Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Write a byte-level BPE in the released CLIP tokenizers' layout with merges for `WORDS`
    (`write_clip_word_tokenizer`) to `path` and load it. SD3's second tokenizer pads with "!"
    (id 0), the others with `<|endoftext|>`."""
    return write_clip_word_tokenizer(path, WORDS, CLIP_MAX_LENGTH, pad_token)


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        return write_clip_tokenizer(Path(tmp), pad_token)


def t5_tokenizer() -> T5Tokenizer:
    """A Unigram vocabulary in T5's layout (`<pad>` 0, `</s>` 1, `<unk>` 2), with `WORDS`
    and the letters, and no sentinel ids."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,.!'"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_encoder(
    tokenizer: CLIPTokenizer, width: int, projection: bool, seed: int
) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width + 5,
        projection_dim=width - 8,
        num_hidden_layers=3,  # SD3 reads the penultimate layer
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return randomize(cls(config), seed)


def t5_encoder(tokenizer: T5Tokenizer, seed: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as in SD3
        is_encoder_decoder=False,
    )
    return randomize(T5EncoderModel(config), seed)


def sd_text_components(seed: int = 0) -> dict:
    tokenizer = clip_tokenizer()
    return {
        "tokenizer": tokenizer,
        "text_encoder": clip_encoder(tokenizer, CLIP_WIDTH, False, seed),
    }


def sd3_text_components(seed: int = 0, t5: bool = True) -> dict:
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    parts = {
        "tokenizer": tokenizer,
        "text_encoder": clip_encoder(tokenizer, CLIP_WIDTH, True, seed),
        "tokenizer_2": tokenizer_2,
        "text_encoder_2": clip_encoder(tokenizer_2, CLIP_G_WIDTH, True, seed + 1),
        "tokenizer_3": None,
        "text_encoder_3": None,
    }
    if t5:
        parts["tokenizer_3"] = t5_tokenizer()
        parts["text_encoder_3"] = t5_encoder(parts["tokenizer_3"], seed + 2)
    return parts


def sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny StableDiffusionPipeline (the SD1/SD2 layout: one CLIP text encoder)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CLIP_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=randomize(AutoencoderKL(**TINY_VAE), seed + 10),
        unet=randomize(unet, seed + 11),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **sd_text_components(seed),
    )


def sd3_pipeline(seed: int = 0, t5: bool = True, sd3_vae: bool = False) -> StableDiffusion3Pipeline:
    """A tiny StableDiffusion3Pipeline; `t5=False` leaves out text_encoder_3/tokenizer_3 (the
    pipeline then uses zeros of the transformer's `joint_attention_dim` for T5's part);
    `sd3_vae` gives it SD3's 16-channel VAE settings (scaling and shift, no quant convs) and
    SD3's scheduler shift, 3."""
    torch.manual_seed(seed)
    parts = sd3_text_components(seed, t5)
    vae = {**TINY_VAE, **SD3_VAE} if sd3_vae else TINY_VAE
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=vae["latent_channels"],
        out_channels=vae["latent_channels"],
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=(CLIP_WIDTH - 8) + (CLIP_G_WIDTH - 8),
        pos_embed_max_size=8,
    )
    return StableDiffusion3Pipeline(
        transformer=randomize(transformer, seed + 11),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0 if sd3_vae else 1.0),
        vae=randomize(AutoencoderKL(**vae), seed + 10),
        **parts,
    )


def write_released_clip_layout(folder: Path) -> None:
    """Rewrite a `CLIPTextModel` folder's weights under the names of the released SD
    checkpoints (saved by transformers 4): `text_model.` prefixes and the `position_ids`
    buffer, which transformers 5 neither writes nor needs."""
    file = folder / "model.safetensors"
    state = {"text_model." + k: v for k, v in load_file(file).items()}
    positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
    state["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    save_file(state, file, metadata={"format": "pt"})
