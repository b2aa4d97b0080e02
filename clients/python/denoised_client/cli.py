"""The `denoised-client` command line.

    denoised-client generate --model digits-dit --label 3 --sampler dpmpp-2m --steps 20 \\
        --guidance 3 -o out.png
    denoised-client models
    denoised-client health

The server is `--url` (or DENOISED_URL, default http://127.0.0.1:8000); an API key comes from
`--api-key` or DENOISED_API_KEY. Errors print the server's message and exit with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from denoised_client._core import DEFAULT_URL, RetryPolicy
from denoised_client.client import Client
from denoised_client.errors import DenoisedError
from denoised_client.types import GenerationRequest, Progress


class ProgressBar:
    """A one-line text bar on `out`, redrawn in place: `[#####.....] 10/20 steps`."""

    def __init__(self, out: TextIO, width: int = 30) -> None:
        self.out = out
        self.width = width

    def __call__(self, event: Progress) -> None:
        filled = round(self.width * event.fraction)
        bar = "#" * filled + "." * (self.width - filled)
        self.out.write(f"\r[{bar}] {event.step}/{event.total} steps")
        if event.step >= event.total:
            self.out.write("\n")
        self.out.flush()


def _label(value: str) -> str | int:
    """`--label 3` is a class name; `--label id:3` a class id (the native endpoint)."""
    return int(value[3:]) if value.startswith("id:") else value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="denoised-client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=os.environ.get("DENOISED_URL", DEFAULT_URL))
    parser.add_argument("--api-key", default=os.environ.get("DENOISED_API_KEY"))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--retries", type=int, default=3, help="on 429/503 (default 3)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images and save them")
    gen.add_argument("--model", help="model id (default: the server's first)")
    gen.add_argument("--label", type=_label, help="class name, or id:N for a class id")
    gen.add_argument("-n", "--n", type=int, default=1, help="number of images")
    gen.add_argument("--sampler", help="ddim, dpmpp-2m, dpmpp-3m, dpmpp-2m-sde, euler, heun, unipc")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float, dest="guidance_scale", help="guidance scale")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--size", help="WIDTHxHEIGHT")
    gen.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a sampler option (JSON value), e.g. eta=1.0; repeatable",
    )
    gen.add_argument(
        "--format",
        dest="output_format",
        default=None,
        choices=("png", "webp", "npy"),
        help="default: from -o's suffix, else png",
    )
    gen.add_argument(
        "--deadline",
        type=float,
        dest="deadline",
        help="server-side timeout in seconds (504 when it passes)",
    )
    gen.add_argument(
        "--openai",
        action="store_true",
        help="use POST /v1/images/generations instead of /v1/generate",
    )
    gen.add_argument(
        "-o",
        "--output",
        default="out.png",
        help="file to write; with n > 1, NAME-<index>.SUFFIX (default out.png)",
    )
    gen.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (and no streaming)",
    )

    models = sub.add_parser("models", help="list the served models")
    models.add_argument("--json", action="store_true", help="print the list as JSON")
    sub.add_parser("health", help="print readiness; exit 0 when ready")
    return parser


def _options(pairs: list[str]) -> dict | None:
    options = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--option wants NAME=VALUE, got {pair!r}")
        try:
            options[name] = json.loads(raw)
        except ValueError:
            options[name] = raw
    return options or None


def _generate(client: Client, args: argparse.Namespace) -> int:
    output = Path(args.output)
    suffix = output.suffix[1:].lower()
    fmt = args.output_format or (suffix if suffix in ("webp", "npy") else "png")
    request = GenerationRequest(
        label=args.label,
        model=args.model,
        n=args.n,
        size=args.size,
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        sampler_options=_options(args.option),
        output_format=fmt,
        timeout=args.deadline,
    )
    endpoint = "images" if args.openai else "generate"
    bar = ProgressBar(sys.stderr) if args.progress else None
    result = client.create(request, endpoint=endpoint, on_progress=bar)
    for path in result.save(output):
        print(path)
    print(
        f"model={result.model} label={result.label} sampler={result.sampler} "
        f"steps={result.steps} guidance={result.guidance_scale} seed={result.seed} "
        f"id={result.id}",
        file=sys.stderr,
    )
    return 0


def _models(client: Client, args: argparse.Namespace) -> int:
    models = client.models()
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
        return 0
    for m in models:
        classes = f"{len(m.classes)} classes" if m.classes else "unconditional"
        print(
            f"{m.id}\t{m.architecture}/{m.process}\t{','.join(m.sizes)}\t{classes}\t"
            f"default {m.defaults.sampler} × {m.defaults.steps}"
        )
    return 0


def _health(client: Client, args: argparse.Namespace) -> int:
    readiness = client.ready()
    print(f"{readiness.status}: {', '.join(readiness.models) or 'no models'}")
    return 0 if readiness.ready else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    retry = RetryPolicy(max_retries=max(0, args.retries))
    commands = {"generate": _generate, "models": _models, "health": _health}
    try:
        with Client(args.url, api_key=args.api_key, timeout=args.timeout, retry=retry) as client:
            return commands[args.command](client, args)
    except (DenoisedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
