"""Model directories: `config.json` + safetensors, loaded exactly or not at all.

A model directory holds

    config.json          what the model is (format in docs/models.md)
    model.safetensors    the backbone's parameters
    vae.safetensors      the latent decoder's parameters (latent models only)

Loading checks every tensor name and shape against the architecture before anything is
copied, and reports all problems at once. Pickle files (.pt/.pth/.ckpt/.bin/.pkl) are never
opened here: unpickling can run arbitrary code. `denoised convert` turns them into a model
directory once, explicitly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from denoised.models.backbones.architecture import Architecture
from denoised.models.backbones.dit import DiT, DiTConfig
from denoised.models.backbones.mmdit import MMDiT, MMDiTConfig
from denoised.models.backbones.unet import UNet, UNetConfig
from denoised.models.backbones.unet_text import UNetText, UNetTextConfig
from denoised.models.backbones.vae import VAEConfig, VAEDecoder
from denoised.models.sampling.process import Process, process_from_config
from denoised.models.sampling.samplers import SAMPLER_NAMES

if TYPE_CHECKING:
    from denoised.models.text.conditioner import TextConditioner

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VAE_WEIGHTS_FILE = "vae.safetensors"
TEXT_DIR = "text"  # a text model's encoders and tokenizers, in a diffusers pipeline's layout
FORMAT = "denoised.model/1"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
DEFAULT_KEYS = ("sampler", "steps", "guidance_scale", "size")  # config.json's "defaults"
MAX_GUIDANCE_SCALE = 100.0  # the API's bound on guidance_scale

# family -> (backbone class, architecture config class). SiT is DiT with a flow process;
# MMDiT is Stable Diffusion 3's text-conditioned transformer.
BACKBONES: dict[str, tuple[type[nn.Module], type[Architecture]]] = {
    "dit": (DiT, DiTConfig),
    "sit": (DiT, DiTConfig),
    "unet": (UNet, UNetConfig),
    "mmdit": (MMDiT, MMDiTConfig),
    "unet-text": (UNetText, UNetTextConfig),
}


@dataclass
class LoadedModel:
    name: str
    config: dict
    backbone: nn.Module
    process: Process
    vae: VAEDecoder | None
    class_names: list[str] | None
    num_classes: int | None  # the null label is `num_classes` (when the model has one)
    latent_shape: tuple[int, int, int]  # (C, H, W) the sampler works in
    image_size: int  # pixels per side of the decoded image
    out_channels_used: int  # leading backbone output channels that form the prediction
    guided_channels: int  # leading channels guidance applies to (0: no guidance)
    has_null_label: bool  # the class table has the null row (id `num_classes`) for no class
    # (token width, pooled width or None) of the TextContext a text-conditioned backbone takes
    # as `y`; None: the backbone takes class ids (or nothing)
    text_dims: tuple[int, int | None] | None = None
    text: TextConditioner | None = None  # text models: the prompt encoders and tokenizers

    @property
    def null_label(self) -> int | None:
        """The class id trained as "no class" (None: no such row, or no classes at all)."""
        return self.num_classes if self.has_null_label else None


def build_backbone(family: str, architecture: dict) -> nn.Module:
    if family not in BACKBONES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(BACKBONES)}")
    module_cls, config_cls = BACKBONES[family]
    return module_cls(config_cls.from_dict(architecture))


def _architecture(backbone: nn.Module) -> DiTConfig | UNetConfig:
    """The config of a backbone of BACKBONES (nn.Module types its attributes as modules)."""
    return cast("DiTConfig | UNetConfig", backbone.config)


def backbone_family(backbone: nn.Module) -> str:
    for family, (module_cls, _) in BACKBONES.items():
        if type(backbone) is module_cls:
            return family
    raise ValueError(f"{type(backbone).__name__} is not a supported backbone")


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU; ValueError naming the file if it is
    missing, truncated or otherwise not a valid safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(
            f"{path} is not a valid safetensors file (truncated or corrupt?): {e}"
        ) from None


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """ValueError listing every missing key, unexpected key and shape mismatch of `state`
    against `module`'s parameters and persistent buffers."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if problems:
        raise ValueError(f"{what} does not match its architecture — " + " | ".join(problems))


def load_weights(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    what: str,
    dtype: torch.dtype | None = None,
) -> None:
    """Make `state` (cast to `dtype` if given) the tensors of `module` once `check_state_dict`
    passed: all or nothing. `module` may live on the meta device; its tensors are replaced."""
    check_state_dict(module, state, what)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__} has tensors no file provides: {left}")


CONVERT_HINT = (
    "convert it once with `denoised convert {src} <output-dir>` and serve the output directory"
)
PICKLE_HINT = "pickle files are not loaded at serve time because unpickling can run arbitrary code"


def check_model_dir(path: str | os.PathLike) -> Path:
    """`path` when it is a model directory (a folder with config.json), else a ValueError that
    says what it is instead and what to do: a pickle checkpoint or a folder of them (never
    unpickled: that can run arbitrary code), a diffusers pipeline folder, a lone weights file,
    a missing path. The one diagnosis `load_model_dir` and `denoised serve` share."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(
                f"{path} is a pickle checkpoint: {PICKLE_HINT}; " + CONVERT_HINT.format(src=path)
            )
        if path.suffix == ".safetensors":
            raise ValueError(
                f"{path} is a weights file, not a model directory ({CONFIG_FILE} + "
                f"{WEIGHTS_FILE}); `denoised convert` makes one from an original .pt "
                "checkpoint or a diffusers pipeline folder"
            )
        raise ValueError(
            f"{path} is a file, not a model directory (a folder with {CONFIG_FILE} and "
            f"{WEIGHTS_FILE})"
        )
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist")
    if not (path / WEIGHTS_FILE).exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{path} holds pickle checkpoints ({', '.join(pickles)}) and no {WEIGHTS_FILE}: "
                f"{PICKLE_HINT}; " + CONVERT_HINT.format(src=path / pickles[0])
            )
        if (path / "model_index.json").exists():
            raise ValueError(
                f"{path} is a diffusers pipeline folder; " + CONVERT_HINT.format(src=path)
            )
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path} is not a model directory: {CONFIG_FILE} is missing")
    return path


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; ValueError naming the file when it is missing, not JSON or
    not an object."""
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    config = read_json_object(file)
    for key in ("family", "architecture", "process"):
        if key not in config:
            raise ValueError(f"{file} lacks the required key {key!r}")
    return config


def check_defaults(defaults: object, guided_channels: int, size: str) -> None:
    """ValueError naming every bad `defaults.<key>` of a config (the serving defaults the API
    applies when a request leaves a field out), so a bad one fails this model's load and not
    the requests or warm-up of a running server."""
    if defaults is None:
        return
    if not isinstance(defaults, dict):
        raise ValueError(f"defaults must be an object {{{', '.join(DEFAULT_KEYS)}}}")
    problems = [
        f"defaults.{key} is not a serving default (allowed: {', '.join(DEFAULT_KEYS)})"
        for key in defaults
        if key not in DEFAULT_KEYS
    ]
    if "sampler" in defaults and defaults["sampler"] not in SAMPLER_NAMES:
        problems.append(
            f"defaults.sampler must be one of {', '.join(SAMPLER_NAMES)}, "
            f"got {defaults['sampler']!r}"
        )
    steps = defaults.get("steps", 1)
    if type(steps) is not int or steps < 1:
        problems.append(f"defaults.steps must be an integer ≥ 1, got {steps!r}")
    scale = defaults.get("guidance_scale", 1.0)
    if type(scale) not in (int, float) or not 0 <= scale <= MAX_GUIDANCE_SCALE:
        problems.append(
            f"defaults.guidance_scale must be a number in 0..{MAX_GUIDANCE_SCALE:g}, got {scale!r}"
        )
    elif scale != 1 and not guided_channels:
        problems.append(
            f"defaults.guidance_scale is {scale:g} but the model cannot be guided "
            "(guided_channels 0); use 1 or leave it out"
        )
    if defaults.get("size", size) not in (size, "auto"):
        problems.append(
            f"defaults.size must be the model's native size {size!r}, got {defaults['size']!r}"
        )
    if problems:
        raise ValueError("; ".join(problems))


def describe(config: dict, backbone: nn.Module, vae: VAEDecoder | None) -> dict:
    """The derived facts of a model: shapes, labels and the channels guidance applies to."""
    arch = _architecture(backbone)
    num_classes: int | None
    text_dims = None
    if isinstance(arch, DiTConfig):
        channels, side, num_classes = arch.in_channels, arch.input_size, arch.num_classes
        has_null = True
    elif isinstance(arch, MMDiTConfig):
        channels, side, num_classes, has_null = arch.in_channels, arch.sample_size, None, False
        text_dims = (arch.joint_attention_dim, arch.pooled_projection_dim)
        if arch.out_channels < channels:
            raise ValueError(
                f"the backbone predicts {arch.out_channels} channels of its {channels} inputs"
            )
    elif isinstance(arch, UNetTextConfig):
        channels, side, num_classes, has_null = arch.in_channels, arch.sample_size, None, False
        text_dims = (arch.cross_attention_dim, None)
    else:
        channels, side, num_classes = arch.in_channels, arch.sample_size, arch.num_classes
        has_null = num_classes is not None and arch.null_label
    class_names = config.get("class_names")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"config lists {len(class_names)} class names but the model has {num_classes} classes"
        )
    # A text-conditioned model is guided against the encoding of an empty prompt.
    guidable = has_null or text_dims is not None
    guided = config.get("guided_channels", channels if guidable else 0)
    if not 0 <= guided <= channels or (guided and not guidable):
        raise ValueError(
            f"guided_channels={guided} is invalid: the model has {channels} channels"
            + ("" if guidable else " and no null label, so it cannot be guided")
        )
    if vae is not None and vae.config.latent_channels != channels:
        raise ValueError(
            f"the VAE takes {vae.config.latent_channels} latent channels; "
            f"the backbone makes {channels}"
        )
    image_size = side * (vae.config.downscale if vae is not None else 1)
    check_defaults(config.get("defaults"), guided, f"{image_size}x{image_size}")
    return {
        "class_names": class_names,
        "num_classes": num_classes,
        "latent_shape": (channels, side, side),
        "image_size": image_size,
        "out_channels_used": channels,
        "guided_channels": guided,
        "has_null_label": bool(has_null),
        "text_dims": text_dims,
    }


def save_model_dir(
    path: str | os.PathLike,
    backbone: nn.Module,
    config: dict,
    vae: VAEDecoder | None = None,
    text_from: str | os.PathLike | None = None,
) -> Path:
    """Write `backbone` (and `vae`) with `config` as a model directory; returns its path.

    `config` needs at least `process`; `family` defaults from the backbone type ("dit",
    "unet" or "mmdit"), `architecture` and `vae` are filled in from the modules, `name`
    defaults to the directory name. A text-conditioned backbone takes `text_from`: a diffusers
    pipeline folder whose text encoders and tokenizers are copied into `text/` as they are
    (without them the backbone loads, but is not served). Everything is validated the way
    `load_model_dir` would.
    """
    path = Path(path)
    config = dict(config)
    config.setdefault("family", backbone_family(backbone))
    if BACKBONES.get(config["family"], (None,))[0] is not type(backbone):
        raise ValueError(f"family {config['family']!r} does not match a {type(backbone).__name__}")
    config["architecture"] = _architecture(backbone).to_dict()
    config["vae"] = None if vae is None else vae.config.to_dict()
    if "process" not in config:
        raise ValueError("config needs a 'process' entry (see models/sampling/process.py)")
    config["process"] = process_from_config(config["process"]).to_config()
    config.setdefault("name", path.name)
    config = {"format": FORMAT, **config}
    if text_from is not None and describe(config, backbone, vae)["text_dims"] is None:
        raise ValueError("text_from is for text-conditioned backbones only")
    describe(config, backbone, vae)
    path.mkdir(parents=True, exist_ok=True)
    if text_from is not None:
        from denoised.models.text.loading import copy_text_parts  # transformers: text only

        copy_text_parts(Path(text_from), path / TEXT_DIR)
    _write_weights(backbone, path / WEIGHTS_FILE)
    if vae is not None:
        _write_weights(vae, path / VAE_WEIGHTS_FILE)
    else:  # an earlier model's decoder in this directory must not be served with this one
        (path / VAE_WEIGHTS_FILE).unlink(missing_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def _write_weights(module: nn.Module, file: Path) -> None:
    """`module`'s tensors as a safetensors file with the mode any new file gets (0666 less the
    umask, like config.json): `save_file` makes it 0600, which a container running as another
    uid cannot read from a mounted model directory."""
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, file)
    umask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(umask)
    file.chmod(0o666 & ~umask)


def load_model_dir(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a model directory in eval mode on `device` in `dtype` (the VAE too).

    ValueError, before any weights are copied, when the path is not a model directory (see
    `check_model_dir`), when config.json is invalid (its `defaults` included), or when the
    weights do not match the architecture exactly (every missing/unexpected key and shape
    mismatch is listed).
    """
    path = check_model_dir(path)
    config = read_config(path)
    process = process_from_config(config["process"])
    # Built on the meta device: the file's tensors become the parameters, so nothing is
    # initialised only to be overwritten (seconds and gigabytes for DiT-XL).
    with torch.device("meta"):
        backbone = build_backbone(config["family"], config["architecture"])
        vae = VAEDecoder(VAEConfig.from_dict(config["vae"])) if config.get("vae") else None
    try:
        facts = describe(config, backbone, vae)
    except ValueError as e:
        raise ValueError(f"{path / CONFIG_FILE}: {e}") from None
    weights = path / WEIGHTS_FILE
    load_weights(backbone, read_safetensors(weights), str(weights), dtype)
    backbone = backbone.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if vae is not None:
        weights = path / VAE_WEIGHTS_FILE
        load_weights(vae, read_safetensors(weights), str(weights), dtype)
        vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    text = None
    if facts["text_dims"] is not None and (path / TEXT_DIR).is_dir():
        text = load_text(path / TEXT_DIR, device, dtype, facts["text_dims"])
    return LoadedModel(
        name=config.get("name", path.name),
        config=config,
        backbone=backbone,
        process=process,
        vae=vae,
        text=text,
        **facts,
    )


def load_text(
    folder: Path, device: torch.device | str, dtype: torch.dtype, dims: tuple[int, int | None]
) -> TextConditioner:
    """A text model's encoders from `folder`, checked against what its backbone takes:
    `dims` = (token width, pooled width or None)."""
    from denoised.models.text.conditioner import TextConditioner  # transformers: text only

    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"{folder}: a text-conditioned model needs its text encoders and tokenizers there "
            "(model_index.json and the text_encoder/ and tokenizer/ folders it names)"
        )
    text = TextConditioner.from_pipeline_dir(folder, device, dtype, token_width=dims[0])
    probe = text.encode([""])[0]
    got = (probe.tokens.shape[-1], None if probe.pooled is None else probe.pooled.shape[-1])
    if got != dims:
        raise ValueError(
            f"{folder}: the text encoders give (token width, pooled width) {got}; the "
            f"backbone takes {dims}"
        )
    return text
