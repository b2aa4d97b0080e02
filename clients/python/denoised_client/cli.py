"""The `denoised-client` command line.

    denoised-client generate --model digits-dit --label 3 --sampler dpmpp-2m --steps 20 \\
        --guidance 3 -o out.png
    denoised-client models
    denoised-client health

The server is `--url` (or DENOISED_URL, default http://127.0.0.1:8000); an API key comes from
`--api-key` or DENOISED_API_KEY. Errors (the server's message, an unreachable server, a file
that cannot be written) print one line and exit with status 1 — before the request is sent
wherever they can be known then. Mistaken arguments (an --option without `=`, an -o suffix
that names no format or another than --format) exit with status 2, like argparse's own.
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
from denoised_client.types import GenerationRequest, Progress, image_paths

OUTPUT_FORMATS = ("png", "webp", "npy")


class ProgressBar:
    """A text bar on `out`: `[#####.....] 10/20 steps`. On a terminal it is redrawn in place;
    elsewhere (a log file, a pipe) it is written as plain lines, one per tenth of the steps."""

    def __init__(self, out: TextIO, width: int = 30) -> None:
        self.out = out
        self.width = width
        self.live = out.isatty()
        self._tenths = 0  # of the steps, written as lines so far

    def __call__(self, event: Progress) -> None:
        filled = round(self.width * event.fraction)
        text = f"[{'#' * filled}{'.' * (self.width - filled)}] {event.step}/{event.total} steps"
        if self.live:
            self.out.write("\r" + text + ("\n" if event.step >= event.total else ""))
        else:
            tenths = 10 * event.step // event.total if event.total else 10
            if tenths <= self._tenths:
                return
            self._tenths = tenths
            self.out.write(text + "\n")
        self.out.flush()


def _label(value: str) -> str | int:
    """`--label 3` is a class name; `--label id:3` a class id."""
    if not value.startswith("id:"):
        return value
    try:
        return int(value[3:])
    except ValueError:
        raise argparse.ArgumentTypeError(f"id: takes a whole number, got {value!r}") from None


def _option(pair: str) -> tuple[str, object]:
    """`--option NAME=VALUE`: the value as JSON, else as the string given."""
    name, sep, raw = pair.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"wants NAME=VALUE, got {pair!r}")
    try:
        return name, json.loads(raw)
    except ValueError:
        return name, raw


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="denoised-client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=os.environ.get("DENOISED_URL", DEFAULT_URL))
    parser.add_argument("--api-key", default=os.environ.get("DENOISED_API_KEY"))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="on 429/503 with Retry-After, and on refused connections (default 3)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images and save them")
    gen.add_argument("--model", help="model id (default: the server's first)")
    gen.add_argument(
        "--label",
        type=_label,
        help="class name, or id:N for a class id (with --openai looked up in /v1/models)",
    )
    gen.add_argument("-n", "--n", type=int, default=1, help="number of images")
    gen.add_argument("--sampler", help="ddim, dpmpp-2m, dpmpp-3m, dpmpp-2m-sde, euler, heun, unipc")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float, dest="guidance_scale", help="guidance scale")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--size", help="WIDTHxHEIGHT")
    gen.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a sampler option (JSON value), e.g. eta=1.0; repeatable",
    )
    gen.add_argument(
        "--format",
        dest="output_format",
        default=None,
        choices=OUTPUT_FORMATS,
        help="default: from -o's suffix (.png, .webp, .npy), else png",
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


def _output_format(output: Path, given: str | None) -> str:
    """`--format`, else the format -o's suffix names, else png. A suffix that names no format
    the server writes, or another one than --format, is refused: the file would hold data of
    a kind its name denies."""
    suffix = output.suffix[1:].lower()
    if not suffix:
        return given or "png"
    if suffix not in OUTPUT_FORMATS:
        allowed = ", ".join(f".{f}" for f in OUTPUT_FORMATS)
        raise ValueError(f"-o {output}: the server writes {allowed} files; use one (or none)")
    if given is not None and given != suffix:
        raise ValueError(f"-o {output} names a .{suffix} file but --format is {given}")
    return suffix


def _check_writable(paths: list[Path]) -> None:
    """Refuse before sending what could not be saved once the work is done."""
    folder = paths[0].parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {paths[0]}: {folder} is not an existing directory")
    for path in paths:
        if path.is_dir():
            raise ValueError(f"cannot write {path}: it is a directory")
        if not os.access(path if path.exists() else folder, os.W_OK):
            raise ValueError(f"cannot write {path}: permission denied")


def _class_name(client: Client, model: str | None, class_id: int) -> str:
    """The class name for `--label id:N` on the OpenAI-shaped endpoint, whose `prompt` is a
    name: looked up in the model's card (the server's first model when none is named)."""
    cards = [client.model(model)] if model else client.models()
    if not cards:
        raise ValueError("the server lists no models")
    card = cards[0]
    count = card.num_classes if card.num_classes is not None else len(card.classes or ())
    if not count:
        raise ValueError(f"model {card.id!r} is unconditional: it has no class id {class_id}")
    if not 0 <= class_id < count:
        raise ValueError(f"--label id:{class_id}: model {card.id!r} has class ids 0..{count - 1}")
    # A model without class names takes its ids as names ("3").
    return card.classes[class_id] if card.classes else str(class_id)


def _generate(client: Client, args: argparse.Namespace) -> int:
    output = Path(args.output)
    _check_writable(image_paths(output, range(args.n)))
    label = args.label
    if args.openai and isinstance(label, int):
        label = _class_name(client, args.model, label)
    request = GenerationRequest(
        label=label,
        model=args.model,
        n=args.n,
        size=args.size,
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        sampler_options=dict(args.option) or None,
        output_format=args.output_format,
        timeout=args.deadline,
    )
    endpoint = "images" if args.openai else "generate"
    bar = ProgressBar(sys.stderr) if args.progress else None
    # OpenAI's image stream reports steps only as partial images: ask for them.
    previews = bar is not None and args.openai
    result = client.create(request, endpoint=endpoint, on_progress=bar, preview=previews)
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
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        try:
            args.output_format = _output_format(Path(args.output), args.output_format)
        except ValueError as exc:
            parser.error(str(exc))
    retry = RetryPolicy(max_retries=max(0, args.retries))
    commands = {"generate": _generate, "models": _models, "health": _health}
    try:
        with Client(args.url, api_key=args.api_key, timeout=args.timeout, retry=retry) as client:
            return commands[args.command](client, args)
    except (DenoisedError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
