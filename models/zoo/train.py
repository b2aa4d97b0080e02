"""The zoo recipe: train a shipped digits model from scratch on the CPU.

    python -m denoised.models.zoo.train digits-dit [--steps N] [--out DIR] [--threads N]

Each model's backbone, process and hyper-parameters live in `recipes.json`. Training is plain
denoising regression — draw a native time from the process, noise a batch, regress the
process's target — with AdamW, a linear warm-up then cosine decay of the learning rate, an
exponential moving average (EMA) of the weights (the shipped weights), and label dropout: a
fraction of labels is replaced by the null label `num_classes`, so the same network also
learns the unconditional prediction that classifier-free guidance (Ho & Salimans, 2022)
needs. Everything random comes from one seeded generator, so a run is reproducible on a
given machine and torch build.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from denoised.models.backbones.dit import DiT
from denoised.models.checkpoints.model_dir import build_backbone, save_model_dir
from denoised.models.sampling.process import FlowProcess, Process, VPProcess, process_from_config
from denoised.models.zoo.cli import positive_int
from denoised.models.zoo.data import CLASS_NAMES, load_digits_split
from denoised.models.zoo.shapes import make_dataset
from denoised.models.zoo.shapes_judge import to_model_range
from denoised.models.zoo.shapes_text import (
    TextToImage,
    build_text_encoder,
    token_ids,
    write_pipeline_text,
    write_tokenizer,
)

ZOO_DIR = Path(__file__).parent
RECIPES_PATH = ZOO_DIR / "recipes.json"


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float  # the cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float
    ema_decay: float
    label_dropout: float
    seed: int
    # Noise levels: a fraction `uniform_fraction` of each batch takes the process's own
    # training-time draw (uniform τ or σ, which covers the very noisiest levels the samplers
    # start from); the rest draws the log signal-to-noise ratio λ ~ N(log_snr_mean,
    # log_snr_std²) — the logit-normal of Esser et al. (2024) for the flow — where the
    # uniform draws waste little work on levels whose target is nearly the input itself.
    uniform_fraction: float = 1.0
    log_snr_mean: float = 0.0
    log_snr_std: float = 1.0


@dataclass
class TrainResult:
    ema: nn.Module
    losses: list[tuple[int, float, float]]  # (step, mean loss over the log window, lr)
    seconds: float


def load_recipes() -> dict:
    return json.loads(RECIPES_PATH.read_text())


def native_time_at_log_snr(process: Process, log_snr: torch.Tensor) -> torch.Tensor:
    """The native time whose λ = log(α/σ) is ``log_snr``."""
    if isinstance(process, VPProcess):  # σ/α = exp(−λ)
        t = process.time_at_sigma_ratio(torch.exp(-log_snr).double().numpy())
        return torch.as_tensor(t, dtype=torch.float32)
    if isinstance(process, FlowProcess):  # (1 − σ)/σ = exp(λ)
        return torch.sigmoid(-log_snr)
    raise ValueError(f"no log-SNR time map for process {type(process).__name__}")


def sample_times(process: Process, n: int, s: TrainSettings, generator: torch.Generator):
    t = process.sample_train_times(n, generator).float()
    log_snr = s.log_snr_mean + s.log_snr_std * torch.randn(n, generator=generator)
    pick = torch.rand(n, generator=generator) >= s.uniform_fraction
    return torch.where(pick, native_time_at_log_snr(process, log_snr), t)


def learning_rate(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - 1 - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    # Early on the average follows the weights closely (a warm-up of the decay), so the EMA of
    # a short run is not dominated by the random initialisation.
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - d)


def train(
    model: nn.Module,
    process: Process,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    null_y: torch.Tensor,
    s: TrainSettings,
    log: Callable[[str], None] = print,
    log_every: int = 100,
    on_log: Callable[[nn.Module, int], object] | None = None,
) -> TrainResult:
    """Train `model(x_t, t, y)` in place on images `x_all` conditioned on `y_all` (class ids
    [N], or a text model's token ids [N, L]); returns its EMA copy. Dropout replaces a row's
    `y` by `null_y` (the null class, or the empty prompt's ids). `on_log(ema, step)` runs at
    each log line (the recipe uses it to write snapshots that can be judged while training
    runs)."""
    generator = torch.Generator().manual_seed(s.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    channels = x_all.shape[1]
    losses, window = [], []
    start = time.perf_counter()
    for step in range(s.steps):
        idx = torch.randint(0, len(y_all), (s.batch_size,), generator=generator)
        x0, y = x_all[idx].float(), y_all[idx].clone()
        y[torch.rand(s.batch_size, generator=generator) < s.label_dropout] = null_y
        t = sample_times(process, s.batch_size, s, generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = process.add_noise(x0, noise, t)
        model_t = torch.as_tensor(process.model_time(t.double().numpy()), dtype=torch.float32)
        out = model(x_t, model_t, y)[:, :channels]
        loss = F.mse_loss(out, process.training_target(x0, noise, t))
        lr = learning_rate(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, step, s.ema_decay)
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == s.steps:
            mean = sum(window) / len(window)
            losses.append((step + 1, mean, lr))
            window.clear()
            elapsed = time.perf_counter() - start
            log(f"step {step + 1:5d}/{s.steps}  loss {mean:.4f}  lr {lr:.2e}  {elapsed:5.0f} s")
            if on_log is not None:
                on_log(ema, step + 1)
    return TrainResult(ema.eval(), losses, time.perf_counter() - start)


def write_loss_curve(
    losses: list[tuple[int, float, float]], csv_path: Path, png_path: Path
) -> None:
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows((step, f"{loss:.6f}", f"{lr:.6g}") for step, loss, lr in losses)
    # A bare line plot (log-scaled loss against step) with Pillow, the one imaging library the
    # package already depends on.
    width, height, pad = 480, 240, 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    steps = [s for s, _, _ in losses]
    logs = [math.log10(loss) for _, loss, _ in losses]
    lo, hi = min(logs), max(logs)
    span_y, span_x = max(hi - lo, 1e-6), max(steps[-1] - steps[0], 1)
    points = [
        (pad + (s - steps[0]) / span_x * (width - 2 * pad),
         height - pad - (v - lo) / span_y * (height - 2 * pad))
        for s, v in zip(steps, logs, strict=True)
    ]  # fmt: skip
    draw.rectangle((pad, pad, width - pad, height - pad), outline="gray")
    if len(points) > 1:
        draw.line(points, fill="navy", width=2)
    draw.text((pad, 8), f"training loss (log scale) {10**hi:.3g} .. {10**lo:.3g}", fill="black")
    draw.text((pad, height - pad + 8), f"step {steps[0]} .. {steps[-1]}", fill="black")
    image.save(png_path)


def train_recipe(
    name: str, out_dir: Path, steps: int | None = None, snapshot_every: int | None = None
) -> Path:
    """Train the recipe `name` and write its model directory (EMA weights stored in fp16),
    loss curve (loss.csv, loss.png) and training record (training.json) under out_dir/name."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    recipe = load_recipes()[name]
    settings = TrainSettings(**{**recipe["train"], **({} if steps is None else {"steps": steps})})
    torch.manual_seed(settings.seed)
    backbone = build_backbone(recipe["family"], recipe["architecture"])
    if isinstance(backbone, DiT):
        backbone.initialize_for_training()
    process = process_from_config(recipe["process"])
    config = {"name": name, "family": recipe["family"], "process": recipe["process"],
              "defaults": recipe["defaults"]}  # fmt: skip
    model: nn.Module
    if "text_encoder" in recipe:  # a text model: captions through a jointly trained encoder
        data = recipe["data"]
        tokenizer = write_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer", data["max_tokens"])
        model = TextToImage(build_text_encoder(tokenizer, recipe["text_encoder"]), backbone)
        images, captions, _ = make_dataset(data["scenes"], data["seed"])
        x_all, y_all = to_model_range(images), token_ids(tokenizer, captions)
        null_y = token_ids(tokenizer, [""])[0]
    else:
        model, config["class_names"] = backbone, CLASS_NAMES
        split = load_digits_split()
        x_all, y_all, null_y = split.train_x, split.train_y, torch.tensor(len(CLASS_NAMES))

    def save(ema: nn.Module, step: int | None = None) -> Path:
        # fp16 storage halves the files; the loader casts to the serving dtype.
        if not isinstance(ema, TextToImage):
            return save_model_dir(out_dir / name, copy.deepcopy(ema).half(), config)
        with tempfile.TemporaryDirectory() as pipeline:
            write_pipeline_text(Path(pipeline), ema.encoder, tokenizer)
            backbone = copy.deepcopy(ema.backbone).half()
            return save_model_dir(out_dir / name, backbone, config, text_from=pipeline)

    snapshot = save if snapshot_every else None
    result = train(
        model, process, x_all, y_all, null_y, settings,
        log_every=snapshot_every or 100, on_log=snapshot,
    )  # fmt: skip
    path = save(result.ema)
    write_loss_curve(result.losses, path / "loss.csv", path / "loss.png")
    record = {
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "train_seconds": round(result.seconds, 1),
        "final_loss": round(result.losses[-1][1], 5),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (path / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{name}: wrote {path} ({result.seconds:.0f} s)")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="recipes to train (default: all)")
    parser.add_argument("--steps", type=positive_int, help="override the recipe's step count")
    parser.add_argument("--out", type=Path, default=ZOO_DIR, help="parent of the model dirs")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--snapshot-every",
        type=positive_int,
        help="also write the model dir every N steps while training",
    )
    args = parser.parse_args(argv)
    recipes = load_recipes()
    unknown = [name for name in args.names if name not in recipes]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(recipes)}")
    torch.set_num_threads(args.threads)
    for name in args.names or list(recipes):
        train_recipe(name, args.out, args.steps, args.snapshot_every)


if __name__ == "__main__":
    main()
