"""The small trained models shipped as defaults, and the recipe that trained them.

`ZOO_MODELS` are model directories next to this file, loaded with
`denoised.models.checkpoints.model_dir.load_model_dir` like any other; `hashes.json` records
the SHA-256 of their files (see `hashes.py`). Training and evaluation (`train.py`,
`evaluate.py`) need scikit-learn and scipy (the `test` extra); loading the models needs
neither.
"""

from pathlib import Path

ZOO_DIR = Path(__file__).parent
CLASS_MODELS = ("digits-dit", "digits-flow", "digits-unet")  # class-conditional digits
TEXT_MODELS = ("shapes-text",)  # text-to-image: coloured shapes from prompts
ZOO_MODELS = CLASS_MODELS + TEXT_MODELS
