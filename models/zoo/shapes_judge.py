"""The judge of prompt adherence for the shapes models: a small CNN trained on rendered scenes
to read back every attribute a caption can name (GenEval-style, Ghosh et al., 2023: a
generated image counts as right on an attribute when the judge reads the prompt's value).

One trunk, one head per attribute of `shapes.Scene.labels`; single-object heads (colour,
shape, size, position) are trained on one-object scenes, pair heads (axis, colour_a, ...) on
two-object ones, and the count head on both.

    python -m denoised.models.zoo.shapes_judge            # the shipped judge: held-out accuracy
    python -m denoised.models.zoo.shapes_judge --train    # retrain: models/zoo/shapes-judge/
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from denoised.models.zoo.cli import add_judge_arguments, command_parser, positive_int
from denoised.models.zoo.shapes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, make_dataset

SHAPES_JUDGE_DIR = Path(__file__).parent / "shapes-judge"
HELD_OUT_SEED, HELD_OUT_SCENES = 1_000_003, 2_000  # never a training seed of the judge or model
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "count": ("1", "2"),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "axis": ("horizontal", "vertical"),
    "colour_a": tuple(COLOURS),
    "shape_a": SHAPES,
    "colour_b": tuple(COLOURS),
    "shape_b": SHAPES,
}


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """[N, 32, 32, 3] uint8 → [N, 3, 32, 32] float32 in [-1, 1], the range models sample in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def label_ids(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Per attribute, each scene's value id, or −1 where the scene has no such attribute."""
    ids = {name: torch.full((len(scenes),), -1, dtype=torch.int64) for name in ATTRIBUTES}
    for i, scene in enumerate(scenes):
        for name, value in scene.labels.items():
            ids[name][i] = ATTRIBUTES[name].index(value)
    return ids


class ShapesJudge(nn.Module):
    """[B, 3, 32, 32] in [-1, 1] → logits per attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16×16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({n: nn.Linear(128, len(v)) for n, v in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x)
        return {name: head(features) for name, head in self.heads.items()}


def judge_loss(logits: dict[str, torch.Tensor], ids: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the attributes each scene has (−1 ids are left out)."""
    losses = [F.cross_entropy(logits[n], ids[n], ignore_index=-1) for n in ATTRIBUTES]
    return torch.stack([loss for loss in losses if not torch.isnan(loss)]).mean()


@torch.inference_mode()
def read_attributes(judge: ShapesJudge, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The judge's value id per attribute for each image ([B] int64 each)."""
    return {name: logits.argmax(1) for name, logits in judge(images).items()}


def train_shapes_judge(
    scenes: int = 20_000, epochs: int = 4, batch_size: int = 128, seed: int = 0
) -> ShapesJudge:
    """A judge trained on freshly rendered scenes (seed `seed`); evaluation renders its own
    with another seed."""
    images, _, scene_list = make_dataset(scenes, seed)
    x, ids = to_model_range(images), label_ids(scene_list)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    judge = ShapesJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(scenes, generator=generator).split(batch_size):
            loss = judge_loss(judge(x[idx]), {n: v[idx] for n, v in ids.items()})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return judge.eval()


def accuracy(judge: ShapesJudge, images: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Per attribute, the fraction of the scenes that have it on which the judge reads the
    scene's value."""
    read, want = read_attributes(judge, images), label_ids(scenes)
    result = {}
    for name in ATTRIBUTES:
        has = want[name] >= 0
        if has.any():
            result[name] = float((read[name][has] == want[name][has]).float().mean())
    return result


def load_shapes_judge(path: Path = SHAPES_JUDGE_DIR) -> ShapesJudge:
    judge = ShapesJudge()
    judge.load_state_dict(load_file(path / "model.safetensors"))
    return judge.eval()


def held_out_accuracy(judge: ShapesJudge) -> dict[str, float]:
    """Per-attribute accuracy on `HELD_OUT_SCENES` scenes rendered with `HELD_OUT_SEED`."""
    images, _, scenes = make_dataset(HELD_OUT_SCENES, HELD_OUT_SEED)
    return accuracy(judge, to_model_range(images), scenes)


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(__doc__)
    add_judge_arguments(parser, SHAPES_JUDGE_DIR, epochs=4)
    parser.add_argument("--scenes", type=positive_int, default=20_000, help="with --train")
    args = parser.parse_args(argv)
    if not args.train:
        result = held_out_accuracy(load_shapes_judge(args.out))
        print(f"shapes judge in {args.out}: held-out accuracy " + ", ".join(
            f"{name} {value:.4f}" for name, value in result.items()))  # fmt: skip
        return
    start = time.perf_counter()
    judge = train_shapes_judge(scenes=args.scenes, epochs=args.epochs)
    seconds = time.perf_counter() - start
    result = held_out_accuracy(judge)
    args.out.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()},
              args.out / "model.safetensors")  # fmt: skip
    info = {"held_out_accuracy": {k: round(v, 4) for k, v in result.items()},
            "held_out_scenes": HELD_OUT_SCENES, "train_seconds": round(seconds, 1)}  # fmt: skip
    (args.out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"shapes judge: held-out accuracy {result} ({seconds:.0f} s), wrote {args.out}")


if __name__ == "__main__":
    main()
