"""Prompt adherence of the zoo's text-to-image models, per sampler × NFE × guidance.

    python -m denoised.models.zoo.evaluate_text            # the documented rows (docs/zoo.md)
    python -m denoised.models.zoo.evaluate_text --samplers euler --nfe 10 --guidance 3

GenEval-style (Ghosh et al., 2023): each row generates one image for each of `--prompts`
full-attribute prompts (scenes drawn with `PROMPT_SEED`, a seed no training run uses, so
the prompts need not have been seen in training; one seeded generator per row), through the
serving path (`load_model_dir`, the model's text encoder, `create_sampler` / `sample`, the
empty prompt as the unguided rows). The shapes judge (`shapes_judge.py`) reads every
attribute back; a row reports, per attribute, the fraction of the images whose prompt names
it on which the judge reads the prompt's value — colour, shape, size and position of single
objects; the pair's colours, shapes (in reading order) and relation axis for two — and the
fraction right on every attribute at once. Rows are saved to `eval/text/<model>.json` with
the SHA-256 of the model's and the judge's weights, and the table in docs/zoo.md between the
markers below is rewritten from those files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from denoised.models.checkpoints.model_dir import LoadedModel, load_model_dir
from denoised.models.conditioning import Conditioning
from denoised.models.sampling.samplers import SAMPLER_NAMES, create_sampler, sample
from denoised.models.text.prompts import stack_prompts
from denoised.models.zoo import TEXT_MODELS, ZOO_DIR
from denoised.models.zoo.cli import add_grid_arguments, command_parser, positive_int
from denoised.models.zoo.evaluate import DOC_PATH, replace_section, sampler_steps
from denoised.models.zoo.hashes import file_hash
from denoised.models.zoo.shapes import Scene, full_caption, random_scene
from denoised.models.zoo.shapes_judge import (
    ATTRIBUTES,
    SHAPES_JUDGE_DIR,
    label_ids,
    load_shapes_judge,
    read_attributes,
)

SAMPLERS = ("euler", "ddim", "dpmpp-2m", "heun")
NFES = (10, 20)
GUIDANCE = (1.0, 3.0)
PROMPTS = 128  # per row
PROMPT_SEED = 2_000_003
RESULTS_DIR = ZOO_DIR / "eval" / "text"
BEGIN, END = "<!-- zoo-text-eval:begin -->", "<!-- zoo-text-eval:end -->"
# The table's columns: the attributes a prompt can name (the count is not a prompt's word).
COLUMNS = [name for name in ATTRIBUTES if name != "count"]


def adherence_prompts(n: int, seed: int = PROMPT_SEED) -> tuple[list[str], list[Scene]]:
    """`n` scenes with their full captions (every attribute named)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return [full_caption(scene) for scene in scenes], scenes


@torch.inference_mode()
def generate_from_prompts(
    model: LoadedModel, prompts: list[str], sampler: str, nfe: int, guidance: float, seed: int = 0
) -> tuple[torch.Tensor, int]:
    """One image per prompt ([n, C, H, W] in [-1, 1]) and the evaluations spent."""
    assert model.text is not None  # a text-to-image model
    generator = torch.Generator().manual_seed(seed)
    n = len(prompts)
    state = create_sampler(
        sampler, model.process, sampler_steps(sampler, nfe), (n, *model.latent_shape), generator
    )
    context = stack_prompts(model.text.encode(prompts))
    empty = model.text.encode([""])[0].context()
    conditioning = Conditioning.prompts(1, context, empty, guidance)
    if conditioning.guided:  # n prompts, not one prompt n times: only the empty one repeats
        conditioning = Conditioning(context, empty.repeat_rows(n), conditioning.scale)
    x = sample(model.backbone, state, conditioning, model.guided_channels)
    return x.clamp(-1, 1), state.nfe


def adherence(judge, images: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Per attribute of `COLUMNS`, the fraction of the images whose scene has it on which the
    judge reads the scene's value; "all": the fraction right on every attribute they have."""
    read, want = read_attributes(judge, images.float()), label_ids(scenes)
    every = torch.ones(len(scenes), dtype=torch.bool)
    result = {}
    for name in COLUMNS:
        has = want[name] >= 0
        right = read[name] == want[name]
        every &= right | ~has
        if has.any():
            result[name] = float(right[has].float().mean())
    result["all"] = float(every.float().mean())
    return result


def evaluate(rows, prompts: int, results_dir: Path = RESULTS_DIR, zoo_dir: Path = ZOO_DIR) -> None:
    judge = load_shapes_judge()
    texts, scenes = adherence_prompts(prompts)
    results_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, LoadedModel] = {}
    for name, sampler, nfe, w in rows:
        path = results_dir / f"{name}.json"
        results = json.loads(path.read_text()) if path.exists() else {"rows": []}
        if name not in models:
            models[name] = load_model_dir(zoo_dir / name)
        start = time.perf_counter()
        x, evaluations = generate_from_prompts(models[name], texts, sampler, nfe, w)
        seconds = time.perf_counter() - start
        row = {
            "model": name, "sampler": sampler, "nfe": nfe, "guidance": w,
            "evaluations": evaluations, "prompts": prompts, **adherence(judge, x, scenes),
            "seconds": round(seconds, 1),
            "model_sha256": file_hash(zoo_dir / name / "model.safetensors"),
            "judge_sha256": file_hash(SHAPES_JUDGE_DIR / "model.safetensors"),
        }  # fmt: skip
        key = (name, sampler, nfe, w)
        results["rows"] = [r for r in results["rows"] if row_key(r) != key] + [row]
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(
            f"{name} {sampler:9s} nfe {nfe:2d} (evals {evaluations:2d}) w {w:g}: all "
            f"{row['all']:.3f}  " + " ".join(f"{c} {row[c]:.2f}" for c in COLUMNS),
            flush=True,
        )


def row_key(row: dict) -> tuple:
    return (row["model"], row["sampler"], row["nfe"], row["guidance"])


def load_text_results(results_dir: Path = RESULTS_DIR) -> list[dict]:
    return [
        r for p in sorted(results_dir.glob("*.json")) for r in json.loads(p.read_text())["rows"]
    ]


def render_table(rows: list[dict], model: str | None = None) -> str:
    """The adherence table (percentages), of one model's rows or of all."""
    picked = [r for r in rows if model is None or r["model"] == model]
    order = {s: i for i, s in enumerate(SAMPLER_NAMES)}
    picked.sort(key=lambda r: (r["model"], r["guidance"], order[r["sampler"]], r["nfe"]))
    head = ["sampler", "NFE", "evals", "guidance", *COLUMNS, "all"]
    if model is None:
        head.insert(0, "model")
    left = len(head) - len(COLUMNS) - 3  # the text columns: model (if any), sampler, NFE
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * left + "---:|" * (len(head) - left)]
    for r in picked:
        cells = [r["sampler"], str(r["nfe"]), str(r["evaluations"]), f"{r['guidance']:g}"]
        cells += [f"{100 * r[c]:.0f}" for c in [*COLUMNS, "all"]]
        lines.append("| " + " | ".join(([r["model"]] if model is None else []) + cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(__doc__)
    add_grid_arguments(parser, TEXT_MODELS, SAMPLERS, SAMPLER_NAMES, NFES, GUIDANCE)
    parser.add_argument("--prompts", type=positive_int, default=PROMPTS, help="per row")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="per-model JSON dir")
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="markdown file to update")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [
        (m, s, n, w) for m in args.models for s in args.samplers for n in args.nfe
        for w in args.guidance
    ]  # fmt: skip
    evaluate(rows, args.prompts, args.results)
    if args.doc.exists():
        replace_section(args.doc, BEGIN, END, render_table(load_text_results(args.results)))


if __name__ == "__main__":
    main()
