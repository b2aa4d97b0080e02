"""The digit classifier that judges generated samples, and the Fréchet distance on its features.

A small CNN trained on the training split only (never the held-out digits it is later compared
against). Its 64-d penultimate pre-activations are the feature space of the Fréchet distance
(Heusel et al., 2017, with this classifier in place of Inception): the distance between two
Gaussians fitted to the features of two image sets.

    python -m denoised.models.zoo.judge            # the shipped judge's held-out accuracy
    python -m denoised.models.zoo.judge --train    # retrain and rewrite models/zoo/judge/
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import linalg
from torch import nn

from denoised.models.zoo.cli import add_judge_arguments, command_parser
from denoised.models.zoo.data import load_digits_split

JUDGE_DIR = Path(__file__).parent / "judge"
FEATURES = 64


class DigitJudge(nn.Module):
    """8×8 one-channel digits in [-1, 1] → (features [B, 64], logits [B, 10])."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4×4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 2×2
        )  # fmt: skip
        # Features are taken before the ReLU: rectified features leave many units dead (zero
        # variance), which makes the Fréchet covariances singular.
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4, FEATURES))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURES, 10))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(self.convs(x))
        return f, self.head(f)


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction (background fill), so the judge
    does not hinge on exact placement."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=generator)
    rows = (torch.arange(8)[None, :] + dy[:, None])[:, None, :, None].expand(-1, 1, 8, 10)
    out = padded.gather(2, rows)
    cols = (torch.arange(8)[None, :] + dx[:, None])[:, None, None, :].expand(-1, 1, 8, 8)
    return out.gather(3, cols)


def train_judge(epochs: int = 40, batch_size: int = 64, seed: int = 0) -> DigitJudge:
    split = load_digits_split()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = DigitJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    n = len(split.train_y)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            x = random_shift(split.train_x[idx], generator)
            loss = F.cross_entropy(judge(x)[1], split.train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return judge.eval()


def load_judge(path: Path = JUDGE_DIR) -> DigitJudge:
    judge = DigitJudge()
    judge.load_state_dict(load_file(path / "model.safetensors"))
    return judge.eval()


@torch.no_grad()
def judge_images(judge: DigitJudge, x: torch.Tensor, batch_size: int = 1024):
    """Features [N, 64] (float64 numpy) and predicted classes [N] of images in [-1, 1]."""
    feats, preds = [], []
    for chunk in x.clamp(-1, 1).float().split(batch_size):
        f, logits = judge(chunk)
        feats.append(f.double().numpy())
        preds.append(logits.argmax(1))
    return np.concatenate(feats), torch.cat(preds)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) between Gaussians fitted to feature rows.

    Each set needs more rows than features: with fewer the covariance is singular and the
    distance says more about the sample count than about the samples."""
    for name, rows in (("a", a), ("b", b)):
        if rows.shape[0] <= rows.shape[1]:
            raise ValueError(
                f"Fréchet distance needs more samples than features ({rows.shape[1]}); "
                f"set {name} has {rows.shape[0]}"
            )
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean))


def held_out_accuracy(judge: DigitJudge) -> float:
    split = load_digits_split()
    _, preds = judge_images(judge, split.held_out_x)
    return (preds == split.held_out_y).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(__doc__)
    add_judge_arguments(parser, JUDGE_DIR, epochs=40)
    args = parser.parse_args(argv)
    if not args.train:
        accuracy = held_out_accuracy(load_judge(args.out))
        print(f"judge in {args.out}: held-out accuracy {accuracy:.4f}")
        return
    start = time.perf_counter()
    judge = train_judge(epochs=args.epochs)
    seconds = time.perf_counter() - start
    accuracy = held_out_accuracy(judge)
    args.out.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()},
              args.out / "model.safetensors")  # fmt: skip
    info = {"held_out_accuracy": round(accuracy, 4), "train_seconds": round(seconds, 1)}
    (args.out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"judge: held-out accuracy {accuracy:.4f} ({seconds:.0f} s), wrote {args.out}")


if __name__ == "__main__":
    main()
