"""SHA-256 of the shipped zoo files, recorded in `hashes.json` so an accidental change shows.

python -m denoised.models.zoo.hashes            # check: exit 1 naming files that differ
python -m denoised.models.zoo.hashes --write    # record the files' hashes after retraining
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from denoised.models.zoo import TEXT_MODELS, ZOO_DIR, ZOO_MODELS

HASHES_PATH = ZOO_DIR / "hashes.json"
# A text model's encoder and tokenizer (text/, a StableDiffusionPipeline folder's text parts).
TEXT_FILES = (
    "model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
)  # fmt: skip
# What a model directory is at serve time, plus the judges the evaluations depend on.
HASHED = [f"{m}/{f}" for m in ZOO_MODELS for f in ("config.json", "model.safetensors")]
HASHED += [f"{m}/text/{f}" for m in TEXT_MODELS for f in TEXT_FILES]
HASHED += ["judge/model.safetensors", "shapes-judge/model.safetensors"]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(zoo_dir: Path = ZOO_DIR) -> dict[str, str]:
    return {rel: file_hash(zoo_dir / rel) for rel in HASHED}


def recorded_hashes(path: Path = HASHES_PATH) -> dict[str, str]:
    return json.loads(path.read_text())


def mismatches(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """One line per file whose hash differs from its record, or that only one side lists."""
    lines = []
    for rel in sorted(recorded.keys() | current.keys()):
        if rel not in current:
            lines.append(f"{rel}: recorded but not a hashed file")
        elif rel not in recorded:
            lines.append(f"{rel}: not recorded")
        elif recorded[rel] != current[rel]:
            lines.append(f"{rel}: sha256 {current[rel]}, recorded {recorded[rel]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--write", action="store_true", help="record the current hashes instead of checking"
    )
    parser.add_argument("--hashes", type=Path, default=HASHES_PATH, help="the record to use")
    args = parser.parse_args(argv)
    current = file_hashes()
    if args.write:
        args.hashes.write_text(json.dumps(current, indent=2) + "\n")
        print(f"wrote {args.hashes}")
        return 0
    problems = mismatches(recorded_hashes(args.hashes), current)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{len(problems)} file(s) differ from {args.hashes}", file=sys.stderr)
        return 1
    print(f"all {len(current)} files match {args.hashes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
