"""SHA-256 of the shipped zoo files, recorded in `hashes.json` so an accidental change shows.

python -m denoised.models.zoo.hashes       # rewrite hashes.json after retraining
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from denoised.models.zoo import ZOO_DIR, ZOO_MODELS

HASHES_PATH = ZOO_DIR / "hashes.json"
# What a model directory is at serve time, plus the judge the evaluation depends on.
HASHED = [f"{m}/{f}" for m in ZOO_MODELS for f in ("config.json", "model.safetensors")]
HASHED.append("judge/model.safetensors")


def file_hashes(zoo_dir: Path = ZOO_DIR) -> dict[str, str]:
    return {rel: hashlib.sha256((zoo_dir / rel).read_bytes()).hexdigest() for rel in HASHED}


def main() -> None:
    HASHES_PATH.write_text(json.dumps(file_hashes(), indent=2) + "\n")
    print(f"wrote {HASHES_PATH}")


if __name__ == "__main__":
    main()
