"""Judge the zoo's samples: class accuracy and Fréchet distance per model × sampler × NFE × CFG.

    python -m denoised.models.zoo.evaluate                   # the documented subset (docs/zoo.md)
    python -m denoised.models.zoo.evaluate --full            # every sampler on the whole grid
    python -m denoised.models.zoo.evaluate --models digits-dit --samplers euler --nfe 10

Each row generates `--samples` images (labels cycling 0..9, one seeded generator per row) with
the same `create_sampler` / `sample` path the tests use, loaded through `load_model_dir`. The
judge (`judge.py`, trained on the training split) classifies them — accuracy is the share
classified as the label asked for — and its features give the Fréchet distance to the
held-out real digits. The floor row compares the held-out digits with the training digits.
Rows are saved to `eval/<model>.json` as they finish (one process per model can run in
parallel), and the table in docs/zoo.md between the markers below is rewritten from those
files. Each row records the SHA-256 of the model's and the judge's weights; a re-run reuses a
saved row only if its sample count and both hashes match the current ones (rows saved before
the hashes were recorded count as computed from the weights in `hashes.json`, which the
shipped table was), replaces it otherwise, and says how many rows it reused. `--recompute`
runs every planned row again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from denoised.models.checkpoints.model_dir import LoadedModel, load_model_dir
from denoised.models.conditioning import Conditioning
from denoised.models.sampling.samplers import SAMPLER_NAMES, create_sampler, sample
from denoised.models.zoo import CLASS_MODELS, ZOO_DIR
from denoised.models.zoo.cli import add_grid_arguments, command_parser, positive_int
from denoised.models.zoo.data import load_digits_split
from denoised.models.zoo.hashes import HASHES_PATH, file_hash, recorded_hashes
from denoised.models.zoo.judge import (
    FEATURES,
    JUDGE_DIR,
    frechet_distance,
    judge_images,
    load_judge,
)

NFES = (5, 10, 20, 50)
GUIDANCE = (1.0, 2.0, 4.0)
# The documented subset: the whole NFE × guidance grid for these samplers, the others at
# SPOT_NFES with SPOT_GUIDANCE only (the full table costs hours of 2-core CPU time).
FULL_GRID_SAMPLERS = ("dpmpp-2m", "euler")
SPOT_NFES = (10, 20)
SPOT_GUIDANCE = (2.0,)
RESULTS_DIR = ZOO_DIR / "eval"
DOC_PATH = ZOO_DIR.parents[1] / "docs" / "zoo.md"
SAMPLES = 1000  # per row, as documented; fewer gives noisier, upward-biased distances
# The Fréchet distance fits a 64-d covariance: with no more samples than features it is
# singular, so a row needs at least FEATURES + 1 (and should have many more).
MIN_SAMPLES = FEATURES + 1
BEGIN, END = "<!-- zoo-eval:begin -->", "<!-- zoo-eval:end -->"


def sampler_steps(sampler: str, nfe: int) -> int:
    """Steps whose evaluation count is at most `nfe` (Heun spends 2N − 1 on N steps)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


@torch.inference_mode()
def generate(
    model: LoadedModel, sampler: str, nfe: int, guidance: float, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`n` samples with labels `arange(n) % 10`: (images [n, C, H, W], labels, evaluations)."""
    assert model.num_classes is not None  # the zoo's models are class-conditional
    labels = torch.arange(n) % model.num_classes
    generator = torch.Generator().manual_seed(seed)
    state = create_sampler(
        sampler, model.process, sampler_steps(sampler, nfe), (n, *model.latent_shape), generator
    )
    evaluations = state.nfe
    conditioning = Conditioning.classes(labels, model.null_label, guidance)
    x = sample(model.backbone, state, conditioning, model.guided_channels)
    return x, labels, evaluations


def plan_rows(models, samplers, nfes, guidance, full: bool) -> list[tuple[str, str, int, float]]:
    rows = []
    for m in models:
        for s in samplers:
            whole = full or s in FULL_GRID_SAMPLERS
            for nfe in nfes if whole else [v for v in nfes if v in SPOT_NFES]:
                for w in guidance if whole else [v for v in guidance if v in SPOT_GUIDANCE]:
                    rows.append((m, s, nfe, w))
    return rows


def row_key(row: dict) -> tuple:
    return (row["model"], row["sampler"], row["nfe"], row["guidance"])


def load_results(results_dir: Path = RESULTS_DIR) -> dict:
    """{"floor": ..., "rows": [...]} gathered over the per-model result files."""
    merged: dict = {"rows": []}
    for path in sorted(results_dir.glob("*.json")):
        part = json.loads(path.read_text())
        merged["floor"] = part["floor"]
        merged["rows"] += part["rows"]
    return merged


def floor_row(judge, split, held_out: np.ndarray) -> dict:
    train_features, _ = judge_images(judge, split.train_x)
    _, held_out_pred = judge_images(judge, split.held_out_x)
    return {
        "frechet": frechet_distance(held_out, train_features),
        "judge_accuracy": (held_out_pred == split.held_out_y).float().mean().item(),
    }


def weight_hashes(name: str, zoo_dir: Path = ZOO_DIR, judge_dir: Path = JUDGE_DIR) -> dict:
    """The hashes a row of model `name` records: its weights and the judge's."""
    return {
        "model_sha256": file_hash(zoo_dir / name / "model.safetensors"),
        "judge_sha256": file_hash(judge_dir / "model.safetensors"),
    }


def row_hashes(row: dict, shipped: dict[str, str]) -> dict:
    """A saved row's weight hashes; rows saved before they were recorded take those of
    `shipped` (hashes.json), the weights the shipped table was computed from."""
    return {
        "model_sha256": row.get("model_sha256", shipped.get(f"{row['model']}/model.safetensors")),
        "judge_sha256": row.get("judge_sha256", shipped.get("judge/model.safetensors")),
    }


def evaluate(
    rows,
    samples: int,
    results_dir: Path = RESULTS_DIR,
    zoo_dir: Path = ZOO_DIR,
    recompute: bool = False,
    hashes_path: Path = HASHES_PATH,
) -> int:
    """Run the planned `rows` (model, sampler, nfe, guidance) and save them; returns how many
    saved rows were reused (same sample count and weight hashes) instead of run."""
    if samples < MIN_SAMPLES:
        raise ValueError(f"samples must be at least {MIN_SAMPLES} (judge features + 1)")
    split, judge = load_digits_split(), load_judge()
    held_out, _ = judge_images(judge, split.held_out_x)
    floor = floor_row(judge, split, held_out)
    shipped = recorded_hashes(hashes_path) if hashes_path.exists() else {}
    results_dir.mkdir(exist_ok=True)
    models: dict[str, LoadedModel] = {}
    reused = 0
    for name, sampler, nfe, w in rows:
        path = results_dir / f"{name}.json"
        results = json.loads(path.read_text()) if path.exists() else {"rows": []}
        results["floor"] = floor
        hashes = weight_hashes(name, zoo_dir)
        saved = [r for r in results["rows"] if row_key(r) == (name, sampler, nfe, w)]
        fresh = [r for r in saved if r["samples"] == samples and row_hashes(r, shipped) == hashes]
        if fresh and not recompute:
            reused += 1
            continue
        if name not in models:
            models[name] = load_model_dir(zoo_dir / name)
        start = time.perf_counter()
        x, labels, evaluations = generate(models[name], sampler, nfe, w, samples)
        seconds = time.perf_counter() - start
        features, pred = judge_images(judge, x)
        row = {
            "model": name, "sampler": sampler, "nfe": nfe, "guidance": w,
            "evaluations": evaluations, "samples": samples,
            "accuracy": (pred == labels).float().mean().item(),
            "frechet": frechet_distance(features, held_out), "seconds": seconds, **hashes,
        }  # fmt: skip
        results["rows"] = [r for r in results["rows"] if r not in saved] + [row]
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(
            f"{name:12s} {sampler:12s} nfe {nfe:2d} (evals {evaluations:2d}) w {w:g}: "
            f"acc {row['accuracy']:.3f}  FD {row['frechet']:7.2f}  {seconds:6.1f} s",
            flush=True,
        )
    return reused


# The targets: class accuracy at 20 NFE with the recommended sampler (guidance <= 4)
# for these models, and DPM-Solver++(2M)'s Fréchet distance at 10 NFE against its own 50 NFE.
RECOMMENDED_SAMPLER = "dpmpp-2m"
ACCURACY_TARGET, ACCURACY_MODELS = 0.95, ("digits-dit", "digits-flow")
FD_RATIO_TARGET = 1.5


def render_targets(results: dict) -> list[str]:
    by_key = {row_key(r): r for r in results["rows"]}
    lines = [
        "| model | guidance | accuracy, 20 NFE | FD 10 NFE | FD 50 NFE | ratio 10/50 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model in CLASS_MODELS:
        for w in GUIDANCE:
            r20, r10, r50 = (by_key.get((model, RECOMMENDED_SAMPLER, n, w)) for n in (20, 10, 50))
            if not (r20 and r10 and r50):
                continue
            ratio = r10["frechet"] / r50["frechet"]
            lines.append(
                f"| {model} | {w:g} | {100 * r20['accuracy']:.1f} % | {r10['frechet']:.2f} | "
                f"{r50['frechet']:.2f} | {ratio:.2f}{'' if ratio <= FD_RATIO_TARGET else ' ✗'} |"
            )
    lines.append("")
    for model in ACCURACY_MODELS:
        rows = [by_key.get((model, RECOMMENDED_SAMPLER, 20, w)) for w in GUIDANCE]
        best = max((r for r in rows if r), key=lambda r: r["accuracy"], default=None)
        if best is not None:
            met = "met" if best["accuracy"] >= ACCURACY_TARGET else "MISSED"
            lines.append(
                f"- {model}: best 20-NFE accuracy {100 * best['accuracy']:.1f} % at guidance "
                f"{best['guidance']:g} — accuracy target {met}."
            )
    return lines


def render_table(results: dict) -> str:
    floor = results["floor"]
    lines = [
        f"Targets ({RECOMMENDED_SAMPLER}): class accuracy ≥ {100 * ACCURACY_TARGET:.0f} % at 20 "
        f"NFE for {' and '.join(ACCURACY_MODELS)} at some guidance ≤ 4; Fréchet distance at 10 "
        f"NFE ≤ {FD_RATIO_TARGET}× its 50-NFE value (✗ marks a miss).",
        "",
        *render_targets(results),
        "",
        f"Floor: held-out real digits vs training digits, Fréchet distance "
        f"**{floor['frechet']:.2f}**; the judge classifies the held-out digits with "
        f"{100 * floor['judge_accuracy']:.1f} % accuracy.",
        "",
        "| model | sampler | NFE | evals | guidance | class accuracy | Fréchet distance | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = {s: i for i, s in enumerate(SAMPLER_NAMES)}
    rows = sorted(
        results["rows"],
        key=lambda r: (
            CLASS_MODELS.index(r["model"]),
            order[r["sampler"]],
            r["nfe"],
            r["guidance"],
        ),
    )
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['evaluations']} | "
            f"{r['guidance']:g} | {100 * r['accuracy']:.1f} % | {r['frechet']:.2f} | "
            f"{r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def replace_section(doc_path: Path, begin: str, end: str, body: str) -> None:
    """Rewrite what lies between the markers `begin` and `end` of `doc_path` with `body`."""
    text = doc_path.read_text()
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    if not rest:
        raise ValueError(f"{doc_path} lacks the markers {begin} ... {end}")
    doc_path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def write_doc(results: dict, doc_path: Path = DOC_PATH) -> None:
    replace_section(doc_path, BEGIN, END, render_table(results))


def sample_count(text: str) -> int:
    """argparse type for --samples: enough rows for a non-singular feature covariance."""
    value = positive_int(text)
    if value < MIN_SAMPLES:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_SAMPLES}: the Fréchet distance fits a {FEATURES}-d "
            f"covariance, singular with {value} samples (the documented table uses {SAMPLES})"
        )
    return value


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(__doc__)
    add_grid_arguments(parser, CLASS_MODELS, SAMPLER_NAMES, SAMPLER_NAMES, NFES, GUIDANCE)
    parser.add_argument(
        "--samples", type=sample_count, default=SAMPLES, help=f"per row (≥ {MIN_SAMPLES})"
    )
    parser.add_argument("--full", action="store_true", help="every sampler on the whole grid")
    parser.add_argument(
        "--recompute", action="store_true", help="run every planned row, even if saved"
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="per-model JSON dir")
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="markdown file to update")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.samples < SAMPLES:
        print(
            f"warning: {args.samples} samples per row (documented: {SAMPLES}); the Fréchet "
            "distance is noisier and biased upward, and these rows replace the saved ones",
            file=sys.stderr,
        )
    torch.set_num_threads(args.threads)
    rows = plan_rows(args.models, args.samplers, args.nfe, args.guidance, args.full)
    reused = evaluate(rows, args.samples, args.results, recompute=args.recompute)
    if reused:
        print(f"reused {reused} cached rows (same samples and weights; --recompute runs them)")
    if args.doc.exists():
        write_doc(load_results(args.results), args.doc)


if __name__ == "__main__":
    main()
