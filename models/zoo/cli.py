"""Argument types shared by the zoo's command-line modules."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (a clear usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return value


def command_parser(doc: str | None) -> argparse.ArgumentParser:
    """A zoo command's parser, its module docstring as the description."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_judge_arguments(parser: argparse.ArgumentParser, out: Path, epochs: int) -> None:
    """A judge command's options: --train (else only report), --epochs, --out."""
    parser.add_argument(
        "--train", action="store_true", help="retrain the judge and write its directory"
    )
    parser.add_argument("--epochs", type=positive_int, default=epochs, help="with --train")
    parser.add_argument("--out", type=Path, default=out, help="judge directory")


def add_grid_arguments(
    parser: argparse.ArgumentParser,
    models: Sequence[str],
    samplers: Sequence[str],
    choices: Sequence[str],
    nfes: Sequence[int],
    guidance: Sequence[float],
) -> None:
    """An evaluation's grid: --models, --samplers (from `choices`), --nfe, --guidance."""
    parser.add_argument("--models", nargs="+", default=list(models), choices=models)
    parser.add_argument("--samplers", nargs="+", default=list(samplers), choices=choices)
    parser.add_argument("--nfe", nargs="+", type=positive_int, default=list(nfes))
    parser.add_argument("--guidance", nargs="+", type=float, default=list(guidance))
