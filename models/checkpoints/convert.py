"""`denoised convert`: turn checkpoints users already have into model directories.

Sources:
* an original DiT or SiT `.pt` file (Peebles & Xie, 2023; Ma et al., 2024), read with
  `torch.load(weights_only=True)` so that no code in the file runs. A training checkpoint's
  EMA weights are taken. The stored position table is checked against ours and dropped.
* a diffusers `DiTPipeline` folder (`model_index.json`, `transformer/`, `vae/`,
  `scheduler/`): the transformer's per-attention q/k/v are joined into one projection and its
  per-block copies of the timestep/label embedders must be equal (one copy is kept).
* a diffusers `DDPMPipeline` folder (`unet/`, `scheduler/`).
* a diffusers `StableDiffusionPipeline` (SD 1.x/2.x; Rombach et al., 2022) or
  `StableDiffusion3Pipeline` (Esser et al., 2024) folder: `unet/` or `transformer/` loads as
  it is, `vae/` becomes the decoder, the text encoders and tokenizers are copied into the
  model directory's `text/`.

The scheduler config becomes the model's process definition and `id2label` its class names
(unless class names are given). The output directory must be new or empty unless `force`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from denoised.models.backbones.dit import DIT_SIZES, DiT, DiTConfig
from denoised.models.backbones.embeddings import sincos_2d
from denoised.models.backbones.unet import UNet, UNetConfig
from denoised.models.backbones.vae import VAEConfig, VAEDecoder, vae_decoder_state_dict
from denoised.models.checkpoints.model_dir import (
    BACKBONES,
    load_weights,
    read_json_object,
    read_safetensors,
    save_model_dir,
)
from denoised.models.checkpoints.presets import (
    DDPM_LINEAR_PROCESS,
    ORIGINAL_DIT_GUIDED_CHANNELS,
    SIT_PROCESS,
)
from denoised.models.sampling.process import VP_SCHEDULES

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
# The files a model directory consists of (what `save_model_dir` writes).
# Model ids: they appear in URLs, JSON and metrics labels, so plain characters only.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FAMILY_NAMES = {"dit": "DiT", "sit": "SiT"}


class UsageError(ValueError):
    """The command line asks for something impossible, before any checkpoint is read."""


# ---------------------------------------------------------------------------------------------
# DiT


def dit_state_dict_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a diffusers `DiTTransformer2DModel` state dict onto `DiT`'s parameter names."""
    out: dict[str, torch.Tensor] = {}
    embedders: dict[str, dict[str, torch.Tensor]] = {}
    top = {
        "pos_embed.proj.": "x_embedder.proj.",
        "proj_out_1.": "final_layer.adaLN_modulation.1.",
        "proj_out_2.": "final_layer.linear.",
    }
    inner = {
        "norm1.linear.": "adaLN_modulation.1.",
        "attn1.to_out.0.": "attn.proj.",
        "ff.net.0.proj.": "mlp.fc1.",
        "ff.net.2.": "mlp.fc2.",
    }
    embedder_names = {
        "norm1.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
        "norm1.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
        "norm1.emb.class_embedder.": "y_embedder.",
    }
    unknown = []
    for key, value in state.items():
        if not key.startswith("transformer_blocks."):
            prefix = next((p for p in top if key.startswith(p)), None)
            if prefix is None:
                unknown.append(key)
            else:
                out[top[prefix] + key[len(prefix) :]] = value
            continue
        _, index, rest = key.split(".", 2)
        if rest.startswith(("attn1.to_q.", "attn1.to_k.", "attn1.to_v.")):
            continue  # joined below
        prefix = next((p for p in embedder_names if rest.startswith(p)), None)
        if prefix is not None:
            embedders.setdefault(index, {})[embedder_names[prefix] + rest[len(prefix) :]] = value
            continue
        prefix = next((p for p in inner if rest.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
        else:
            out[f"blocks.{index}.{inner[prefix]}{rest[len(prefix) :]}"] = value
    if unknown:
        raise ValueError(f"unexpected keys in the diffusers DiT state dict: {', '.join(unknown)}")
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for i in blocks:
        for kind in ("weight", "bias"):
            parts = [state.get(f"transformer_blocks.{i}.attn1.to_{x}.{kind}") for x in "qkv"]
            qkv = [p for p in parts if p is not None]
            if len(qkv) < len(parts):
                raise ValueError(f"transformer_blocks.{i}.attn1 lacks one of to_q/to_k/to_v.{kind}")
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
    if not embedders:
        raise ValueError("the diffusers DiT state dict has no timestep/label embedder")
    first = embedders[str(blocks[0])]
    for index, copy in embedders.items():
        if copy.keys() != first.keys() or any(not torch.equal(copy[k], first[k]) for k in first):
            raise ValueError(
                f"transformer_blocks.{index}.norm1.emb differs from block {blocks[0]}'s copy; "
                "DiT shares one timestep/label embedder across blocks"
            )
    out.update(first)
    return out


def _require(cfg: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise ValueError(f"the {what} config lacks {', '.join(missing)}")


def dit_config_from_diffusers(cfg: dict) -> DiTConfig:
    """`DiTConfig` for a diffusers `DiTTransformer2DModel` / `Transformer2DModel` config."""
    kind = cfg.get("_class_name", "DiTTransformer2DModel")
    if kind not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise ValueError(f"transformer class {kind!r} is not a DiT")
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(
            f"only adaLN-Zero DiT transformers convert; got norm_type={cfg['norm_type']!r}"
        )
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ValueError(f"unsupported DiT activation {cfg['activation_fn']!r}")
    if cfg.get("num_embeds_ada_norm") is None:
        raise ValueError(
            "the transformer has no class embedding: unconditional DiTs are not supported"
        )
    _require(
        cfg,
        (
            "num_attention_heads",
            "attention_head_dim",
            "in_channels",
            "sample_size",
            "patch_size",
            "num_layers",
        ),
        "DiT transformer",
    )
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    in_channels = cfg["in_channels"]
    out_channels = cfg.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels={out_channels} is neither in_channels nor twice it")
    return DiTConfig(
        input_size=cfg["sample_size"],
        patch_size=cfg["patch_size"],
        in_channels=in_channels,
        hidden_size=heads * head_dim,
        depth=cfg["num_layers"],
        num_heads=heads,
        num_classes=cfg["num_embeds_ada_norm"],
        learn_sigma=out_channels == 2 * in_channels,
        freq_shift=1.0,
        mlp_norm_eps=cfg.get("norm_eps", 1e-5),
    )


def dit_from_original_state_dict(
    state: dict[str, torch.Tensor], num_heads: int | None = None, input_size: int | None = None
) -> tuple[dict[str, torch.Tensor], DiTConfig]:
    """Infer the `DiTConfig` of an original DiT/SiT state dict, check and drop `pos_embed`.

    Heads default from the paper's sizes (by hidden width); the latent size comes from the
    stored position table (a given size must agree with it), or must be given without one.
    """
    state = dict(state)
    proj = state.get("x_embedder.proj.weight")
    if proj is None:
        raise ValueError("not a DiT/SiT state dict: x_embedder.proj.weight is missing")
    if "y_embedder.embedding_table.weight" not in state:
        raise ValueError(
            "the state dict has no y_embedder.embedding_table.weight: unconditional DiT/SiT "
            "checkpoints are not supported (the DiT backbone is class-conditional)"
        )
    for key in ("final_layer.linear.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"not a complete DiT/SiT state dict: {key} is missing")
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = sum(1 for k in state if k.startswith("blocks.") and k.endswith(".attn.qkv.weight"))
    if num_heads is None:
        by_width = {h: n for _, h, n in DIT_SIZES.values()}
        if hidden not in by_width:
            raise ValueError(f"hidden size {hidden} is not a named DiT size; pass the head count")
        num_heads = by_width[hidden]
    if num_heads <= 0 or hidden % num_heads:
        raise ValueError(f"{num_heads} attention heads do not divide the hidden size {hidden}")
    if input_size is not None and (input_size <= 0 or input_size % patch):
        raise ValueError(
            f"latent size {input_size} is not a positive multiple of the patch {patch}"
        )
    pos_embed = state.pop("pos_embed", None)
    if pos_embed is not None:
        grid = math.isqrt(pos_embed.shape[-2])
        if input_size not in (None, grid * patch):
            raise ValueError(
                f"latent size {input_size} disagrees with the stored pos_embed, which is for "
                f"{grid * patch} ({grid}x{grid} patches of {patch})"
            )
        input_size = grid * patch
        expected = sincos_2d(hidden, grid, grid)
        if pos_embed.reshape(-1, hidden).shape != expected.shape or not torch.allclose(
            pos_embed.reshape(-1, hidden).float(), expected, atol=1e-5
        ):
            raise ValueError("the stored pos_embed is not the fixed 2-D sin-cos table DiT uses")
    if input_size is None:
        raise ValueError("the state dict has no pos_embed; pass the latent size")
    out_features = state["final_layer.linear.weight"].shape[0]
    config = DiTConfig(
        input_size=input_size,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_features == patch * patch * 2 * in_channels,
        freq_shift=0.0,
        mlp_norm_eps=1e-6,
    )
    return state, config


def read_original_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of an original `.pt` file, read weights-only; a training checkpoint's EMA.

    DiT's and SiT's train.py save `{"model", "ema", "opt", "args"}` with `args` an
    `argparse.Namespace`, which the weights-only unpickler is told to allow: rebuilding one
    only creates an empty attribute bag and sets attributes on it (no `__setstate__`, no
    `__reduce__` side effects), and the attribute values still pass the same unpickler, so
    nothing but tensors and plain containers can be created and no code runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    with path.open("rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; files from torch < 1.6 are a bare pickle (protocol 2+).
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise ValueError(f"{path} is not a torch checkpoint (neither a zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names what it refused
        why = (
            f"it holds a {found.group(1)} object, which a weights-only load does not create"
            if found
            else (str(e).strip().splitlines() or [type(e).__name__])[0]
        )
        raise ValueError(f"cannot read {path} as a torch checkpoint: {why}") from None
    if isinstance(obj, dict) and "ema" in obj:
        obj = obj["ema"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# UNet, VAE, scheduler


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """`UNetConfig` for a diffusers `UNet2DModel` config (positional time embedding only)."""
    checks = {
        "time_embedding_type": "positional",
        "act_fn": "silu",
        "resnet_time_scale_shift": "default",
        "class_embed_type": None,
        "mid_block_type": "UNetMidBlock2D",
        "downsample_type": "conv",
        "upsample_type": "conv",
    }
    for key, value in checks.items():
        if cfg.get(key, value) != value:
            raise ValueError(f"unsupported UNet2DModel setting {key}={cfg[key]!r} (need {value!r})")
    if cfg.get("attn_norm_num_groups") not in (None, cfg.get("norm_num_groups", 32)):
        raise ValueError(
            "UNet2DModel attn_norm_num_groups differing from norm_num_groups is not supported"
        )
    _require(cfg, ("block_out_channels", "down_block_types", "up_block_types"), "UNet2DModel")
    rows = cfg.get("num_class_embeds")
    size = cfg.get("sample_size", 32)
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ValueError(f"only square UNets are supported, got sample_size={size}")
        size = size[0]
    return UNetConfig(
        sample_size=size,
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        block_out_channels=tuple(cfg["block_out_channels"]),
        down_block_types=tuple(cfg["down_block_types"]),
        up_block_types=tuple(cfg["up_block_types"]),
        layers_per_block=cfg.get("layers_per_block", 2),
        attention_head_dim=cfg.get("attention_head_dim", 8),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
        freq_shift=cfg.get("freq_shift", 0),
        downsample_padding=cfg.get("downsample_padding", 1),
        mid_block_scale_factor=cfg.get("mid_block_scale_factor", 1),
        add_attention=cfg.get("add_attention", True),
        center_input_sample=cfg.get("center_input_sample", False),
        time_embedding_dim=cfg.get("time_embedding_dim"),
        # A diffusers class table cannot say whether its last row is a null label; a table
        # from label-dropout training has num_classes + 1 rows, which is what we assume.
        num_classes=None if rows is None else rows - 1,
        null_label=True,
    )


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    """`VAEConfig` for a diffusers `AutoencoderKL` config."""
    for kind in cfg.get("up_block_types", ()):
        if kind != "UpDecoderBlock2D":
            raise ValueError(f"unsupported VAE up block {kind!r}")
    if cfg.get("act_fn", "silu") != "silu" or cfg.get("norm_type", "group") != "group":
        raise ValueError("only the SiLU/GroupNorm AutoencoderKL decoder is supported")
    for key in ("latents_mean", "latents_std"):
        if cfg.get(key) is not None:
            raise ValueError(f"AutoencoderKL {key} is not supported (only scaling and shift)")
    return VAEConfig(
        latent_channels=cfg.get("latent_channels", 4),
        out_channels=cfg.get("out_channels", 3),
        block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
        layers_per_block=cfg.get("layers_per_block", 1),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        mid_block_add_attention=cfg.get("mid_block_add_attention", True),
        scaling_factor=cfg.get("scaling_factor") or 0.18215,
        shift_factor=cfg.get("shift_factor") or 0.0,
        # The encoder's quant_conv (use_quant_conv) is not part of the decoder.
        use_post_quant_conv=cfg.get("use_post_quant_conv", True),
    )


_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}
# Scheduler settings that change the trained model's noise process: a value other than the
# one given here would convert to a different process, so it is refused.
_PROCESS_SETTINGS = {"rescale_betas_zero_snr": False, "use_dynamic_shifting": False}
# Scheduler settings that only shape sampling, which the samplers decide themselves and which
# are therefore not carried over (docs/models.md): variance_type (the ancestral step's noise),
# clip_sample/clip_sample_range and thresholding/dynamic_thresholding_ratio/sample_max_value
# (x0 clipping, which no sampler does: docs/samplers.md), timestep_spacing/steps_offset/
# set_alpha_to_one (the sampling grid), use_karras_sigmas and other grid options.


def process_from_scheduler_config(cfg: dict) -> dict:
    """The process definition a diffusers scheduler config describes.

    ValueError naming the key for settings that change the process and have no equivalent.
    """
    for key, plain in _PROCESS_SETTINGS.items():
        if cfg.get(key, plain) not in (plain, None):
            raise ValueError(
                f"scheduler {key}={cfg[key]!r} is not supported: it changes the noise "
                "process the model was trained with"
            )
    name = cfg.get("_class_name", "")
    steps = cfg.get("num_train_timesteps", 1000)
    if name.startswith("FlowMatch"):
        return {
            "type": "flow",
            "shift": cfg.get("shift", 1.0),
            "convention": "rf",
            "num_train_timesteps": steps,
            "prediction": "velocity",
        }
    if cfg.get("trained_betas") is not None:
        raise ValueError("schedulers with explicit trained_betas are not supported")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ValueError(
            f"unsupported scheduler prediction_type {prediction!r}; "
            f"supported: {', '.join(_PREDICTIONS)}"
        )
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in VP_SCHEDULES:
        raise ValueError(
            f"unsupported scheduler beta_schedule {schedule!r}; "
            f"supported: {', '.join(VP_SCHEDULES)}"
        )
    return {
        "type": "vp",
        "schedule": schedule,
        "beta_start": cfg.get("beta_start", 0.0001),
        "beta_end": cfg.get("beta_end", 0.02),
        "num_train_timesteps": steps,
        "prediction": _PREDICTIONS[prediction],
    }


def class_names_from_id2label(
    id2label: dict | None, num_classes: int | None, distinct: bool = False
) -> list[str] | None:
    """The class names of an `id2label` mapping; `distinct` appends the id to a name that an
    earlier class already has (a pipeline's own labels can repeat: ImageNet names classes 134
    and 517 'crane'), so every class stays reachable by name."""
    if not id2label:
        return None
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        raise ValueError("id2label keys must be class ids (0, 1, ...)") from None
    if sorted(labels) != list(range(num_classes or 0)):
        raise ValueError(f"id2label must name exactly the classes 0..{num_classes}-1")
    names = [labels[i] for i in sorted(labels)]  # ids 0..num_classes-1 (checked above)
    if distinct:
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name.strip().lower() in seen:
                names[i] = f"{name} ({i})"
            seen.add(names[i].strip().lower())
    return check_class_names(names)


def check_class_names(names: list[str]) -> list[str]:
    """`names` if every class can be asked for by name: requests name a class ignoring case
    and surrounding spaces, so names must be non-empty, unpadded and distinct ignoring case."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name or name != name.strip():
            raise ValueError(f"class {i}'s name {name!r} is empty or padded with spaces")
        if name.lower() in seen:
            raise ValueError(
                f"classes {seen[name.lower()]} and {i} are both named {name!r} (ignoring "
                "case); the second could not be asked for by name"
            )
        seen[name.lower()] = i
    return names


# ---------------------------------------------------------------------------------------------
# Folders and files


def check_model_name(name: str) -> str:
    """`name` if it can be a served model id: 1-64 letters, digits, `.`, `_`, `-`, starting
    with a letter or digit."""
    if not MODEL_NAME.fullmatch(name):
        raise UsageError(
            f"model name {name!r} is not a valid model id: use 1-64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit (the default is the output folder's name)"
        )
    return name


def check_output(dst: Path, force: bool = False) -> None:
    """Refuse an output that is a file, or a non-empty directory unless `force`."""
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"output {dst} is an existing file, not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise UsageError(f"output directory {dst} is not empty; pass --force to overwrite it")


def _diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            return read_safetensors(folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():  # sharded (SD3.5-large's transformer): the index names each file
            shards = read_json_object(index).get("weight_map")
            if not isinstance(shards, dict):
                raise ValueError(f"{index} lacks its weight_map")
            state = {}
            for shard in sorted(set(shards.values())):
                state.update(read_safetensors(folder / shard))
            return state
    pickles = sorted(folder.glob("*.bin"))
    if pickles:
        try:
            state = torch.load(pickles[0], map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read {pickles[0]} weights-only: {e}") from None
        if isinstance(state, dict):
            return state
    raise ValueError(f"{folder} holds no diffusers weights ({' or '.join(DIFFUSERS_WEIGHTS)})")


def read_diffusers_vae(folder: Path) -> VAEDecoder:
    """The decoder of a diffusers `AutoencoderKL` folder (config.json + weights)."""
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        raise ValueError(
            f"{folder} is not a VAE folder (no config.json) but holds one: pass {folder / 'vae'}"
        )
    vae = VAEDecoder(vae_config_from_diffusers(read_json_object(folder / "config.json")))
    load_weights(vae, vae_decoder_state_dict(_diffusers_weights(folder)), f"VAE in {folder}")
    return vae


def read_diffusers_backbone(folder: Path, family: str) -> nn.Module:
    """A diffusers model folder (config.json + weights) as the backbone of `family`, whose
    config class reads diffusers' config as it is ("unet-text": a Stable Diffusion pipeline's
    `unet/`, "mmdit": an SD3 pipeline's `transformer/`); its tensors in the file's dtype."""
    module_cls, config_cls = BACKBONES[family]
    config = config_cls.from_dict(read_json_object(folder / "config.json"))
    with torch.device("meta"):  # the file's tensors become the parameters
        backbone = module_cls(config)
    load_weights(backbone, _diffusers_weights(folder), f"{folder.name} in {folder.parent}")
    return backbone


@dataclass(frozen=True)
class TextPipeline:
    """How a text-to-image pipeline class converts: its backbone component, the family that
    reads it, the process type its scheduler must give, and the pipeline's own
    `num_inference_steps` and `guidance_scale` defaults, which become the serving defaults."""

    backbone: str
    backbone_class: str
    family: str
    process: str
    steps: int
    guidance_scale: float


TEXT_PIPELINES = {
    # diffusers 0.42.1 StableDiffusionPipeline.__call__: num_inference_steps=50,
    # guidance_scale=7.5.
    "StableDiffusionPipeline": TextPipeline(
        "unet", "UNet2DConditionModel", "unet-text", "vp", 50, 7.5
    ),
    # StableDiffusion3Pipeline.__call__: num_inference_steps=28, guidance_scale=7.0.
    "StableDiffusion3Pipeline": TextPipeline(
        "transformer", "SD3Transformer2DModel", "mmdit", "flow", 28, 7.0
    ),
}
# Components a text pipeline may name that are not converted: SD's safety checker (a filter on
# decoded images) and its image processor. Any other component beyond the backbone, VAE,
# scheduler and text parts (an IP-Adapter image_encoder, ...) must be absent.
_DROPPED_COMPONENTS = ("safety_checker", "feature_extractor")
# Our sampler for a pipeline scheduler that solves the same way; VP models with another
# scheduler (PNDM, LMS, ...) get DPM-Solver++(2M).
_SCHEDULER_SAMPLERS = {
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp-2m",
    "EulerDiscreteScheduler": "euler",
    "FlowMatchEulerDiscreteScheduler": "euler",
    "HeunDiscreteScheduler": "heun",
    "UniPCMultistepScheduler": "unipc",
}


def check_text_pipeline_components(index: dict, spec: TextPipeline, src: Path) -> None:
    """ValueError naming the first component of `model_index.json` that does not convert."""
    from denoised.models.text.loading import TEXT_COMPONENTS  # transformers: text only

    expected = {spec.backbone: spec.backbone_class, "vae": "AutoencoderKL"}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or name == "scheduler":
            continue  # metadata and settings; the scheduler is read into the process
        if name in expected:
            if entry != ["diffusers", expected[name]]:
                raise ValueError(
                    f"{src / 'model_index.json'}: {name} is {entry!r}; expected "
                    f"['diffusers', {expected[name]!r}]"
                )
        elif name not in TEXT_COMPONENTS + _DROPPED_COMPONENTS and entry != [None, None]:
            raise ValueError(
                f"{src / 'model_index.json'}: component {name} ({entry[-1]}) is not supported "
                f"in a {index['_class_name']}"
            )
    for name in expected:
        if name not in index:
            raise ValueError(f"{src / 'model_index.json'} names no {name}")


def convert_text_pipeline(
    src: Path, dst: Path, index: dict, config: dict, class_names: list[str] | None
) -> Path:
    """A `StableDiffusionPipeline` / `StableDiffusion3Pipeline` folder as a model directory:
    the backbone as it is, the VAE decoder, the text encoders and tokenizers copied to
    `text/`, the pipeline's defaults. Everything that can be checked without loading the text
    encoders is checked before anything is written."""
    from denoised.models.text.conditioner import check_pipeline_text  # transformers: text only

    pipeline = index["_class_name"]
    spec = TEXT_PIPELINES[pipeline]
    if class_names is not None:
        raise UsageError(f"--class-names does not apply to {src}: a {pipeline} takes prompts")
    check_text_pipeline_components(index, spec, src)
    if config["process"]["type"] != spec.process:
        raise ValueError(
            f"{src / 'scheduler'} describes a {config['process']['type']} process; a "
            f"{pipeline} needs a {'flow matching' if spec.process == 'flow' else 'VP'} scheduler"
        )
    check_pipeline_text(src)
    scheduler = str(index["scheduler"][-1]) if isinstance(index.get("scheduler"), list) else ""
    default_sampler = "euler" if spec.process == "flow" else "dpmpp-2m"
    config.update(
        family=spec.family,
        defaults={
            "sampler": _SCHEDULER_SAMPLERS.get(scheduler, default_sampler),
            "steps": spec.steps,
            "guidance_scale": spec.guidance_scale,
        },
    )
    backbone = read_diffusers_backbone(src / spec.backbone, spec.family)
    return save_model_dir(dst, backbone, config, vae=read_diffusers_vae(src / "vae"), text_from=src)


def convert_diffusers_pipeline(
    src: Path,
    dst: Path,
    name: str | None = None,
    class_names: list[str] | None = None,
    force: bool = False,
) -> Path:
    """Convert a `DiTPipeline`, `DDPMPipeline`, `StableDiffusionPipeline` or
    `StableDiffusion3Pipeline` folder into a model directory at `dst`.

    `class_names` replace the pipeline's `id2label` (class pipelines only); `force`
    overwrites a non-empty `dst`.
    """
    src, dst = Path(src), Path(dst)
    name = check_model_name(name or dst.name)
    check_output(dst, force)
    index = read_json_object(src / "model_index.json")
    pipeline = index.get("_class_name")
    supported = ("DiTPipeline", "DDPMPipeline", *TEXT_PIPELINES)
    if pipeline not in supported:
        raise ValueError(
            f"unsupported diffusers pipeline {pipeline!r}; supported: {', '.join(supported)}"
        )
    process = process_from_scheduler_config(
        read_json_object(src / "scheduler" / "scheduler_config.json")
    )
    config: dict[str, Any] = {"name": name, "process": process, "source": f"diffusers {pipeline}"}

    def names_for(num_classes: int | None) -> list[str] | None:
        if class_names is not None:
            return class_names
        return class_names_from_id2label(index.get("id2label"), num_classes, distinct=True)

    if pipeline in TEXT_PIPELINES:
        return convert_text_pipeline(src, dst, index, config, class_names)
    if pipeline == "DiTPipeline":
        arch = dit_config_from_diffusers(read_json_object(src / "transformer" / "config.json"))
        backbone = DiT(arch)
        state = dit_state_dict_from_diffusers(_diffusers_weights(src / "transformer"))
        load_weights(backbone, state, f"transformer in {src}")
        config.update(
            family="dit",
            class_names=names_for(arch.num_classes),
            guided_channels=arch.in_channels,  # DiTPipeline guides every latent channel
        )
        return save_model_dir(dst, backbone, config, vae=read_diffusers_vae(src / "vae"))
    unet_arch = unet_config_from_diffusers(read_json_object(src / "unet" / "config.json"))
    unet = UNet(unet_arch)
    load_weights(unet, _diffusers_weights(src / "unet"), f"unet in {src}")
    config.update(family="unet", class_names=names_for(unet_arch.num_classes))
    return save_model_dir(dst, unet, config, vae=None)


def convert_original_checkpoint(
    src: Path,
    dst: Path,
    family: str = "dit",
    vae: Path | None = None,
    class_names: list[str] | None = None,
    num_heads: int | None = None,
    input_size: int | None = None,
    name: str | None = None,
    force: bool = False,
) -> Path:
    """Convert an original DiT (`family="dit"`) or SiT (`"sit"`) `.pt` checkpoint.

    `force` overwrites a non-empty `dst`.
    """
    src, dst = Path(src), Path(dst)
    if family not in _FAMILY_NAMES:
        raise ValueError(f"family must be 'dit' or 'sit', got {family!r}")
    name = check_model_name(name or dst.name)
    check_output(dst, force)
    state, arch = dit_from_original_state_dict(read_original_checkpoint(src), num_heads, input_size)
    backbone = DiT(arch)
    load_weights(backbone, state, str(src))
    config = {
        "name": name,
        "family": family,
        "process": DDPM_LINEAR_PROCESS if family == "dit" else SIT_PROCESS,
        "class_names": class_names,
        "guided_channels": min(ORIGINAL_DIT_GUIDED_CHANNELS, arch.in_channels),
        "source": f"original {_FAMILY_NAMES[family]} checkpoint {src.name}",
    }
    return save_model_dir(
        dst, backbone, config, vae=None if vae is None else read_diffusers_vae(Path(vae))
    )


def read_class_names(path: Path) -> list[str] | None:
    """Class names from a JSON list of names or an id -> name object (UsageError if bad;
    None for an empty object)."""
    if not path.is_file():
        raise UsageError(f"class names file {path} does not exist")
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return class_names_from_id2label(data, len(data))
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return check_class_names(data)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UsageError(f"class names file {path}: {e}") from None
    raise UsageError(
        f"class names file {path} must hold a JSON list of names or an id -> name object"
    )


# Flags that only apply to an original .pt source.
_CHECKPOINT_FLAGS = ("family", "vae", "num_heads", "input_size")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="denoised convert",
        description="Convert an original DiT/SiT .pt checkpoint or a diffusers DiT, DDPM, "
        "Stable Diffusion (1.x/2.x) or Stable Diffusion 3 pipeline folder into a denoised "
        "model directory (config.json + safetensors).",
    )
    parser.add_argument("source", type=Path, help=".pt file or diffusers pipeline folder")
    parser.add_argument("output", type=Path, help="model directory to write")
    parser.add_argument(
        "--family", choices=("dit", "sit"), help="process of a .pt file (default: dit)"
    )
    parser.add_argument("--vae", type=Path, help="diffusers AutoencoderKL folder (for .pt files)")
    parser.add_argument("--class-names", type=Path, help="JSON list or id2label object")
    parser.add_argument("--num-heads", type=int, help="attention heads (default: by DiT size)")
    parser.add_argument("--input-size", type=int, help="latent side (default: from pos_embed)")
    parser.add_argument("--name", help="model name (default: the output folder's name)")
    parser.add_argument(
        "--force", action="store_true", help="overwrite the model files of a non-empty output"
    )
    args = parser.parse_args(argv)
    try:
        out = _convert(args)
    except UsageError as e:
        print(f"denoised convert: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"denoised convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _convert(args: argparse.Namespace) -> Path:
    for flag in ("num_heads", "input_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if not args.source.exists():
        raise UsageError(f"source {args.source} does not exist")
    names = read_class_names(args.class_names) if args.class_names else None
    if args.source.is_dir():
        given = [f for f in _CHECKPOINT_FLAGS if getattr(args, f) is not None]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(
                f"{flags} {verb} only to a .pt checkpoint; {args.source} is a diffusers "
                "pipeline folder, which carries its own settings"
            )
        return convert_diffusers_pipeline(
            args.source, args.output, args.name, names, force=args.force
        )
    return convert_original_checkpoint(
        args.source,
        args.output,
        args.family or "dit",
        args.vae,
        names,
        args.num_heads,
        args.input_size,
        args.name,
        force=args.force,
    )
