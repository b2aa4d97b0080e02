"""The `denoised` command line.

    denoised serve                      serve the shipped default models on 127.0.0.1:8000
    denoised serve --model DIR [...]    serve model directories (repeat --model for several)
    denoised convert SRC OUT            turn a DiT/SiT .pt or a diffusers folder into a model dir

Every `serve` flag has an environment variable (`DENOISED_<FLAG>`, e.g. DENOISED_MAX_BATCH,
DENOISED_MODELS=dir1,dir2); a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from denoised.kernels.backends import ATTENTION_BACKENDS, FUSED_BACKENDS
from denoised.server.settings import BATCHING_MODES, DEVICES, DTYPES, settings_from_env


def _serve_parser(sub) -> argparse.ArgumentParser:
    serve = sub.add_parser(
        "serve",
        help="serve models over HTTP",
        description="Serve models over HTTP (OpenAI-shaped and native endpoints).",
    )
    add = serve.add_argument
    add(
        "--model",
        dest="models",
        action="append",
        metavar="DIR",
        help="model directory (repeatable; default: the shipped zoo models) [DENOISED_MODELS]",
    )
    add("--host", help="interface to bind (default 127.0.0.1) [DENOISED_HOST]")
    add("--port", type=int, help="port (default 8000) [DENOISED_PORT]")
    add(
        "--max-batch",
        type=int,
        help="samples per backbone forward; a guided sample counts twice (default 64)",
    )
    add(
        "--max-queue",
        type=int,
        help="requests waiting for their first step before new ones get 429 (default 256)",
    )
    add("--device", choices=DEVICES, help="default auto: cuda when available")
    add(
        "--dtype",
        choices=DTYPES,
        help="backbone dtype; auto (default): bfloat16 on cuda, and on a cpu with native bf16 "
        "matmul (AMX, AVX512-BF16) for each model whose bf16 outputs stay within 3%% of "
        "float32, else float32; float32 or bfloat16 force one [DENOISED_DTYPE]",
    )
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="run backbones through torch.compile, compiled during warm-up (default on; "
        "cuda: CUDA graphs per batch-size bucket); --no-compile: eager [DENOISED_COMPILE]",
    )
    add(
        "--attention",
        choices=ATTENTION_BACKENDS,
        help="attention backend: auto (default) runs the Triton flash-attention kernel on "
        "CUDA and PyTorch's SDPA elsewhere; triton or sdpa always [DENOISED_ATTENTION]",
    )
    add(
        "--fused",
        choices=FUSED_BACKENDS,
        help="fused elementwise kernels (adaLN, guidance + solver step): auto (default) "
        "runs Triton on CUDA and the PyTorch references elsewhere; triton or reference "
        "always [DENOISED_FUSED]",
    )
    add(
        "--threads",
        type=int,
        help="CPU threads for torch ops (default 0: one per core; 1 suits a shared machine)",
    )
    add(
        "--batching",
        choices=BATCHING_MODES,
        help="step: step-level batching (default); request: equal parameters only, each "
        "batch run to completion (for comparison)",
    )
    add(
        "--drain-seconds",
        type=float,
        help="on SIGTERM, how long admitted requests may take to finish (default 30)",
    )
    add(
        "--max-batch-text-mb",
        type=float,
        help="per forward: MiB of text inputs (encoded prompts, cross-attention caches) the "
        "batcher stacks; the oldest request always runs (default 1024)",
    )
    add(
        "--prompt-cache-mb",
        type=float,
        help="per text model: MiB of encoded prompts kept for reuse (default 256)",
    )
    add("--max-n", type=int, help="most images per request (default 16)")
    add("--max-steps", type=int, help="most sampler steps per request (default 1000)")
    add(
        "--strict-readiness",
        action=argparse.BooleanOptionalAction,
        help="/ready answers 503 while any configured model failed to load, the others "
        "still serving (default on); --no-strict-readiness: ready once one model serves "
        "[DENOISED_STRICT_READINESS]",
    )
    add(
        "--no-warmup",
        dest="warmup",
        action="store_const",
        const=False,
        help="skip the warm-up generation before /ready",
    )
    return serve


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        from denoised.models.checkpoints.convert import main as convert_main

        return convert_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="denoised", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    sub.add_parser("convert", help="convert a checkpoint into a model directory",
                   add_help=False)  # fmt: skip
    args = vars(parser.parse_args(argv))
    args.pop("command")
    try:
        settings = settings_from_env(**args)
    except ValueError as exc:
        parser.error(str(exc))
    from denoised.models.checkpoints.model_dir import CONFIG_FILE, check_model_dir
    from denoised.server.launcher import serve

    # A path that is no model directory at all (a typo, a .pt file, a pipeline folder) is a
    # usage error; one with a config.json that then fails to load is left out at load time.
    for directory in settings.models:
        if not (Path(directory) / CONFIG_FILE).is_file():
            try:
                check_model_dir(directory)
            except ValueError as exc:
                parser.error(str(exc))

    serve(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
