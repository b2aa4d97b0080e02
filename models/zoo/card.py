"""Write each zoo model's card (README.md) from its recipe, training record and evaluation,
with a grid of samples (samples.png) at its defaults: for a class model one column per class
and eight rows, for a text model one row per prompt of `GRID_PROMPTS` and eight columns.

    python -m denoised.models.zoo.card            # check: exit 1 naming cards that are stale
    python -m denoised.models.zoo.card --write    # rewrite the cards and samples.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from denoised.models.checkpoints.model_dir import load_model_dir
from denoised.models.zoo import TEXT_MODELS, ZOO_DIR, ZOO_MODELS
from denoised.models.zoo.evaluate import generate, load_results
from denoised.models.zoo.evaluate_text import (
    PROMPT_SEED,
    generate_from_prompts,
    load_text_results,
    render_table,
)
from denoised.models.zoo.train import load_recipes

OBJECTIVES = {
    ("vp", "epsilon"): "DDPM variance-preserving process, linear β schedule "
    "(1e-4 … 0.02, 1,000 steps), ε-prediction",
    ("vp", "v"): "DDPM variance-preserving process, linear β schedule (1e-4 … 0.02, 1,000 "
    "steps), v-prediction (Salimans & Ho, 2022)",
    ("flow", "velocity"): "rectified flow x = (1−σ)·x0 + σ·ε (Liu et al., 2023), velocity "
    "ε − x0, backbone fed 1000·σ",
}

RESOLUTION = (
    "Native 8×8, one channel, values 0–16 scaled to [−1, 1]. Upsampling to 16×16 would add no "
    "information (the data set has none beyond 8×8) while quadrupling the pixels every step "
    "must process. At 8×8 a patch-2 DiT sees 16 tokens: the recipe's 3,000 steps cost about "
    "5.5 CPU-minutes (about 6 min on an idle core; the shipped runs took 23–24 min of wall "
    "time, three trainings sharing a loaded 2-core machine), and the full sampler evaluation "
    "stays affordable."
)


def quality_lines(name: str, results: dict) -> list[str]:
    rows = [r for r in results.get("rows", []) if r["model"] == name]
    if not rows:
        return ["Not evaluated yet: run `python -m denoised.models.zoo.evaluate`."]
    lines = [
        "| sampler | NFE | guidance | class accuracy | Fréchet distance |",
        "|---|---:|---:|---:|---:|",
    ]
    picked = [r for r in rows if r["sampler"] == "dpmpp-2m" and r["nfe"] in (10, 20, 50)]
    for r in sorted(picked, key=lambda r: (r["nfe"], r["guidance"])):
        lines.append(
            f"| {r['sampler']} | {r['nfe']} | {r['guidance']:g} | {100 * r['accuracy']:.1f} % | "
            f"{r['frechet']:.2f} |"
        )
    floor = results["floor"]["frechet"]
    lines += [
        "",
        f"{rows[0]['samples']} samples per row, judged by the digit classifier of "
        f"`models/zoo/judge.py`; floor (held-out vs training digits) {floor:.2f}. "
        "All samplers: docs/zoo.md.",
    ]
    return lines


def card(name: str, recipe: dict, record: dict, results: dict) -> str:
    p, t, d = recipe["process"], recipe["train"], recipe["defaults"]
    arch = recipe["architecture"]
    if recipe["family"] == "dit":
        backbone = (
            f"DiT (Peebles & Xie, 2023): patch {arch['patch_size']}, hidden {arch['hidden_size']}, "
            f"depth {arch['depth']}, {arch['num_heads']} heads, adaLN-Zero"
        )
    else:
        backbone = (
            f"UNet (diffusers `UNet2DModel` layout): channels {arch['block_out_channels']}, "
            f"{arch['layers_per_block']} resnet per level, attention at 4×4 and in the middle"
        )
    return "\n".join(
        [
            f"# {name}",
            "",
            f'Class-conditional generator of 8×8 handwritten digits (classes "0"–"9"), '
            f"trained from scratch on the CPU by the recipe in `models/zoo/` — "
            f"`python -m denoised.models.zoo.train {name}`.",
            "",
            f"- **Backbone**: {backbone}; {record['parameters']:,} parameters, stored as fp16 "
            f"EMA weights (`model.safetensors`).",
            f"- **Objective**: {OBJECTIVES[(p['type'], p['prediction'])]}. Label dropout "
            f"{t['label_dropout']:.0%} (null label 10) for classifier-free guidance.",
            "- **Data**: scikit-learn's bundled digits (Alpaydin & Kaynak, 1998 — 1,797 images); "
            "training split of 1,433 images, 364 held out for evaluation "
            "(`models/zoo/data.py`).",
            f"- **Resolution**: {RESOLUTION}",
            f"- **Training**: {record['steps']:,} AdamW steps of batch {record['batch_size']}, "
            f"lr {t['lr']:g} (warm-up {t['warmup_steps']}, cosine to {t['min_lr_ratio']:g}×), "
            f"EMA {t['ema_decay']}, seed {t['seed']}; noise levels {t['uniform_fraction']:.0%} "
            f"from the process's uniform draw, the rest log-SNR λ ~ N({t['log_snr_mean']:g}, "
            f"{t['log_snr_std']:g}²); {record['train_seconds'] / 60:.1f} min wall time on "
            f"{record['torch_threads']} CPU thread (shared machine); final loss "
            f"{record['final_loss']:.4f}. Loss curve: `loss.csv`, `loss.png`.",
            f"- **Defaults** (config.json): {d['sampler']}, {d['steps']} steps, guidance "
            f"{d['guidance_scale']:g}. Samples at the defaults (seed 0, one column per class): "
            f"`samples.png`.",
            "",
            "## Quality",
            "",
            *quality_lines(name, results),
            "",
        ]
    )


def write_sample_grid(model_dir: Path, defaults: dict, rows: int = 8, scale: int = 4) -> None:
    model = load_model_dir(model_dir)
    classes = model.num_classes
    assert classes is not None  # the zoo's models are class-conditional
    n = rows * classes
    x, _, _ = generate(model, defaults["sampler"], defaults["steps"], defaults["guidance_scale"], n)
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]  # [n, 8, 8]
    side = pixels.shape[-1]
    # Sample i has label i % 10: row i // 10, column i % 10.
    grid = pixels.view(rows, classes, side, side).permute(0, 2, 1, 3)
    image = Image.fromarray(grid.reshape(rows * side, classes * side).numpy(), mode="L")
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(
        model_dir / "samples.png"
    )


GRID_PROMPTS = [
    "a large red circle on the left",
    "a small blue square at the top",
    "a large yellow triangle at the bottom",
    "a small green circle on the right",
    "a large white square",
    "a red square to the left of a blue circle",
    "a purple triangle above a yellow square",
    "a green circle below a white triangle",
]


def text_card(name: str, recipe: dict, record: dict, rows: list[dict]) -> str:
    p, t, d, data = recipe["process"], recipe["train"], recipe["defaults"], recipe["data"]
    arch, text = recipe["architecture"], recipe["text_encoder"]
    attention = [
        f"{arch['sample_size'] >> i}×{arch['sample_size'] >> i}"
        for i, kind in enumerate(arch["down_block_types"])
        if kind.startswith("CrossAttn")
    ]
    evaluated = [r for r in rows if r["model"] == name]
    quality = (
        [
            f"Prompt adherence (%), GenEval-style: {evaluated[0]['prompts']} full-attribute "
            f"prompts per row (scenes of seed {PROMPT_SEED}, not the training seed), one image "
            "each, read back by the judge of `models/zoo/shapes_judge.py`; single objects: "
            "colour, shape, size, position; pairs: the relation axis and each object's colour "
            "and shape in reading order (a, b); all: every attribute right.",
            "",
            render_table(evaluated, name),
        ]
        if evaluated
        else ["Not evaluated yet: run `python -m denoised.models.zoo.evaluate_text`."]
    )
    return "\n".join(
        [
            f"# {name}",
            "",
            "Text-to-image generator of 32×32 RGB scenes of coloured shapes (one object with a "
            'colour, shape, size and position, or two objects and a relation: "a red square to '
            'the left of a blue circle"), trained from scratch on the CPU by the recipe in '
            f"`models/zoo/` — `python -m denoised.models.zoo.train {name}`.",
            "",
            f"- **Backbone**: text UNet (diffusers `UNet2DConditionModel` layout) in pixel space, "
            f"channels {arch['block_out_channels']}, {arch['layers_per_block']} resnet per "
            f"level, cross-attention at {', '.join(attention)} and in the middle, text width "
            f"{arch['cross_attention_dim']}; stored as fp16 EMA weights (`model.safetensors`).",
            f"- **Text encoder**: a `CLIPTextModel` (hidden {text['hidden_size']}, "
            f"{text['num_hidden_layers']} layers, {text['num_attention_heads']} heads, "
            f"{data['max_tokens']} positions) trained jointly with the backbone, and a "
            "word-level CLIP tokenizer over the caption vocabulary, in `text/` in the layout "
            "of a diffusers `StableDiffusionPipeline` (last hidden state, no mask). "
            f"{record['parameters']:,} parameters in all.",
            f"- **Objective**: {OBJECTIVES[(p['type'], p['prediction'])]}. Prompt dropout "
            f"{t['label_dropout']:.0%} (the empty prompt) for classifier-free guidance.",
            f"- **Data**: {data['scenes']:,} scenes rendered by `models/zoo/shapes.py` (seed "
            f"{data['seed']}) with captions naming all or some of their attributes.",
            f"- **Training**: {record['steps']:,} AdamW steps of batch {record['batch_size']}, "
            f"lr {t['lr']:g} (warm-up {t['warmup_steps']}, cosine to {t['min_lr_ratio']:g}×), "
            f"EMA {t['ema_decay']}, seed {t['seed']}; noise levels {t['uniform_fraction']:.0%} "
            f"uniform, the rest log-SNR λ ~ N({t['log_snr_mean']:g}, {t['log_snr_std']:g}²); "
            f"{record['train_seconds'] / 60:.1f} min wall time on {record['torch_threads']} CPU "
            f"thread (shared machine); final loss {record['final_loss']:.4f}. Loss curve: "
            "`loss.csv`, `loss.png`.",
            f"- **Defaults** (config.json): {d['sampler']}, {d['steps']} steps, guidance "
            f"{d['guidance_scale']:g}. `samples.png`: one row per prompt (seed 0, eight "
            "images each): " + "; ".join(f'"{prompt}"' for prompt in GRID_PROMPTS) + ".",
            "",
            "## Quality",
            "",
            *quality,
            "",
        ]
    )


def write_prompt_grid(model_dir: Path, defaults: dict, columns: int = 8, scale: int = 3) -> None:
    model = load_model_dir(model_dir)
    prompts = [p for p in GRID_PROMPTS for _ in range(columns)]
    sampler, steps, w = defaults["sampler"], defaults["steps"], defaults["guidance_scale"]
    x, _ = generate_from_prompts(model, prompts, sampler, steps, w)
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # [n, 32, 32, 3]
    side = pixels.shape[1]
    grid = pixels.view(len(GRID_PROMPTS), columns, side, side, 3).permute(0, 2, 1, 3, 4)
    image = Image.fromarray(grid.reshape(len(GRID_PROMPTS) * side, columns * side, 3).numpy())
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(
        model_dir / "samples.png"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--write", action="store_true", help="rewrite README.md and samples.png of each model"
    )
    parser.add_argument("--zoo-dir", type=Path, default=ZOO_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    zoo_dir: Path = args.zoo_dir
    recipes = load_recipes()
    results = load_results(zoo_dir / "eval")
    text_rows = load_text_results(zoo_dir / "eval" / "text")
    stale = []
    for name in ZOO_MODELS:
        record = json.loads((zoo_dir / name / "training.json").read_text())
        recipe = recipes[name]
        is_text = name in TEXT_MODELS
        if is_text:
            text = text_card(name, recipe, record, text_rows)
        else:
            text = card(name, recipe, record, results)
        path = zoo_dir / name / "README.md"
        if args.write:
            path.write_text(text)
            (write_prompt_grid if is_text else write_sample_grid)(
                zoo_dir / name, recipe["defaults"]
            )
            print(f"wrote {path} and samples.png")
        elif not path.exists() or path.read_text() != text:
            stale.append(path)
    for path in stale:
        print(f"{path}: differs from what card.py writes (run with --write)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
