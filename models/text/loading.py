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
from dataclasses import dataclass
from pathlib import Path

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


def encoder_folder(path: Path, name: str, cls: str) -> Path:
    """Text encoder `name`'s folder in the pipeline folder `path`; ValueError when it is
    missing or holds its weights only as pickles (never opened: unpickling can run code)."""
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
    return folder


def load_encoder(
    path: Path, name: str, cls: str, device: torch.device | str, dtype: torch.dtype
) -> nn.Module:
    """Text encoder `name` of the pipeline folder `path`, in eval mode on `device` in `dtype`."""
    folder = encoder_folder(path, name, cls)
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


@dataclass(frozen=True)
class TextPart:
    """One tokenizer + text encoder of a pipeline: `tokenizer{suffix}`, `text_encoder{suffix}`
    with the classes each may be; an optional part may be absent from `model_index.json`."""

    suffix: str
    tokenizers: tuple[str, ...]
    encoders: tuple[str, ...]
    required: bool = True


def text_part_classes(path: Path, index: dict, part: TextPart) -> tuple[str, str] | None:
    """The (tokenizer, encoder) classes `model_index.json` names for `part`, None for an
    absent optional part; ValueError, without reading any weights, for another class, a
    missing tokenizer or encoder (or its folder), and encoder weights only as pickles."""
    tokenizer_cls = component_class(index, "tokenizer" + part.suffix, part.tokenizers)
    encoder_cls = component_class(index, "text_encoder" + part.suffix, part.encoders)
    if tokenizer_cls is None and encoder_cls is None and not part.required:
        return None
    if tokenizer_cls is None or encoder_cls is None:
        missing = "tokenizer" if tokenizer_cls is None else "text_encoder"
        raise ValueError(f"{path / 'model_index.json'} names no {missing}{part.suffix}")
    _folder(path, "tokenizer" + part.suffix, tokenizer_cls)
    encoder_folder(path, "text_encoder" + part.suffix, encoder_cls)
    return tokenizer_cls, encoder_cls


def load_text_pair(
    path: Path, index: dict, part: TextPart, device: torch.device | str, dtype: torch.dtype
) -> tuple[PreTrainedTokenizerBase, nn.Module] | None:
    """`part`'s tokenizer and text encoder from the pipeline folder `path`; None when it is
    an absent optional part."""
    classes = text_part_classes(path, index, part)
    if classes is None:
        return None
    return (
        load_tokenizer(path, "tokenizer" + part.suffix, classes[0]),
        load_encoder(path, "text_encoder" + part.suffix, classes[1], device, dtype),
    )


TEXT_COMPONENTS = tuple(
    f"{kind}{suffix}" for suffix in ("", "_2", "_3") for kind in ("text_encoder", "tokenizer")
)


# Files of a component folder that loading never reads, left out of copies: pickled weights
# (refused) and precision variants such as model.fp16.safetensors (only model.safetensors and
# its shards load).
_UNREAD = shutil.ignore_patterns(
    *(f"*{suffix}" for suffix in PICKLE_SUFFIXES), "model.*.safetensors"
)


def copy_text_parts(pipeline: Path, out: Path) -> None:
    """A pipeline folder's text encoders and tokenizers as the folder `out`, in the same
    layout: `model_index.json` (its class and text components only) and their folders, less
    the files loading never reads. ValueError, as loading would give it, for a missing
    component folder."""
    index = read_model_index(pipeline)
    kept = {k: v for k, v in index.items() if k.startswith("_") or k in TEXT_COMPONENTS}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, entry in kept.items():
        if not name.startswith("_") and entry not in (None, [None, None]):
            shutil.copytree(_folder(pipeline, name, str(entry)), out / name, ignore=_UNREAD)
    (out / "model_index.json").write_text(json.dumps(kept, indent=2) + "\n")
