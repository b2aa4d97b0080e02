"""A diffusers pipeline folder's tokenizers and text encoders, through `transformers`.

`model_index.json` names each component's class (`"text_encoder": ["transformers",
"CLIPTextModel"]`, or `[null, null]` for a component the pipeline does without). Only the
classes below load, from local files only, and encoder weights only from safetensors: a
folder with only pickled weights is refused (unpickling can run arbitrary code), as are
weights that leave a parameter missing or of the wrong shape, which `transformers` would
otherwise fill with random values and only warn about.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal, overload

import torch
import transformers
from torch import nn
from transformers import PreTrainedTokenizerBase

from denoised.models.checkpoints.model_dir import PICKLE_HINT, PICKLE_SUFFIXES, read_json_object

CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
T5_TOKENIZERS = ("T5TokenizerFast", "T5Tokenizer")
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")


def read_model_index(path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"pipeline folder {path} does not exist")
    return read_json_object(path / "model_index.json")


def component_class(index: dict, name: str, allowed: tuple[str, ...]) -> str | None:
    """The `transformers` class `model_index.json` names for component `name`, None when the
    pipeline has none; ValueError for any other library or class."""
    entry = index.get(name)
    if entry is None or entry == [None, None]:
        return None
    if not (isinstance(entry, list) and len(entry) == 2) or entry[0] != "transformers":
        raise ValueError(f"model_index.json: {name} is {entry!r}; expected a transformers class")
    if entry[1] not in allowed:
        raise ValueError(
            f"model_index.json: {name} is a {entry[1]}; supported: {', '.join(allowed)}"
        )
    return entry[1]


def _folder(path: Path, name: str, cls: str) -> Path:
    folder = path / name
    if not folder.is_dir():
        raise ValueError(f"{folder} is missing (model_index.json names {name}: {cls})")
    return folder


def load_tokenizer(path: Path, name: str, cls: str) -> PreTrainedTokenizerBase:
    return getattr(transformers, cls).from_pretrained(
        _folder(path, name, cls), local_files_only=True
    )


def load_encoder(
    path: Path, name: str, cls: str, device: torch.device | str, dtype: torch.dtype
) -> nn.Module:
    """Text encoder `name` of the pipeline folder `path`, in eval mode on `device` in `dtype`."""
    folder = _folder(path, name, cls)
    if not any((folder / f).is_file() for f in SAFETENSORS):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{folder / pickles[0]} holds pickled weights and {folder} has no "
                f"{SAFETENSORS[0]}: {PICKLE_HINT}; convert it to safetensors once, where you "
                "trust the file (transformers' save_pretrained(safe_serialization=True))"
            )
        raise ValueError(f"{folder} has no {SAFETENSORS[0]}")
    model, info = getattr(transformers, cls).from_pretrained(
        folder,
        use_safetensors=True,
        local_files_only=True,
        dtype=dtype,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported below with the missing keys, as a ValueError
    )
    mismatched = [
        f"{key}: file {tuple(file)}, config {tuple(expected)}"
        for key, file, expected in sorted(info["mismatched_keys"])
    ]
    problems = []
    if info["missing_keys"]:
        problems.append(f"missing keys: {', '.join(sorted(info['missing_keys']))}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise ValueError(f"{folder} does not match its config.json — " + " | ".join(problems))
    return model.to(device).eval().requires_grad_(False)


@overload
def load_text_pair(
    path: Path,
    index: dict,
    suffix: str,
    tokenizers: tuple[str, ...],
    encoders: tuple[str, ...],
    device: torch.device | str,
    dtype: torch.dtype,
    required: Literal[True] = True,
) -> tuple[PreTrainedTokenizerBase, nn.Module]: ...
@overload
def load_text_pair(
    path: Path,
    index: dict,
    suffix: str,
    tokenizers: tuple[str, ...],
    encoders: tuple[str, ...],
    device: torch.device | str,
    dtype: torch.dtype,
    required: bool,
) -> tuple[PreTrainedTokenizerBase, nn.Module] | None: ...


def load_text_pair(
    path: Path,
    index: dict,
    suffix: str,
    tokenizers: tuple[str, ...],
    encoders: tuple[str, ...],
    device: torch.device | str,
    dtype: torch.dtype,
    required: bool = True,
) -> tuple[PreTrainedTokenizerBase, nn.Module] | None:
    """`tokenizer{suffix}` and `text_encoder{suffix}` of the pipeline folder `path`; None when
    `model_index.json` names neither and they are not `required`."""
    tokenizer_cls = component_class(index, "tokenizer" + suffix, tokenizers)
    encoder_cls = component_class(index, "text_encoder" + suffix, encoders)
    if tokenizer_cls is None and encoder_cls is None and not required:
        return None
    if tokenizer_cls is None:
        raise ValueError(f"{path / 'model_index.json'} names no tokenizer{suffix}")
    if encoder_cls is None:
        raise ValueError(f"{path / 'model_index.json'} names no text_encoder{suffix}")
    return (
        load_tokenizer(path, "tokenizer" + suffix, tokenizer_cls),
        load_encoder(path, "text_encoder" + suffix, encoder_cls, device, dtype),
    )


TEXT_COMPONENTS = tuple(
    f"{kind}{suffix}" for suffix in ("", "_2", "_3") for kind in ("text_encoder", "tokenizer")
)


def copy_text_parts(pipeline: Path, out: Path) -> None:
    """A pipeline folder's text encoders and tokenizers as the folder `out`, in the same
    layout: `model_index.json` (its class and text components only) and their folders.
    ValueError, as loading would give it, for a missing component folder."""
    index = read_model_index(pipeline)
    kept = {k: v for k, v in index.items() if k.startswith("_") or k in TEXT_COMPONENTS}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, entry in kept.items():
        if not name.startswith("_") and entry not in (None, [None, None]):
            shutil.copytree(_folder(pipeline, name, str(entry)), out / name)
    (out / "model_index.json").write_text(json.dumps(kept, indent=2) + "\n")
