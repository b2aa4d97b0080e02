"""`denoised serve` against diffusers' `DiTPipeline` on the same random-weight DiT-S/2.

One diffusers pipeline folder (DiT-S/2, seeded random weights, a small 8x AutoencoderKL, the
DPM-Solver++ scheduler) is written, converted with `denoised convert`, and served by two
`denoised serve` processes (`--dtype float32`, `--dtype bfloat16`; compiled, the default).
diffusers runs in this process the way its example server does: every request one pipeline
call (`class_labels=[label]`, classifier-free guidance), `concurrency` calls at a time on a
thread pool, each with its own scheduler. Both sides do the same work per image: `--steps`
guided evaluations (two backbone rows each) and a VAE decode.

At concurrency 1, 4 and 16, in float32 and in bfloat16, each side finishes the same fixed
workload (every client sends `--requests` requests back to back); images/s and the ratio,
the pairs taken in turn over `--rounds` rounds (median). Then the engine's model FLOP
utilisation at saturation: closed-loop clients (each sends its next request when the last
returns) at `--saturation` concurrencies, and over a `--seconds` window after `--warmup`
the rows forwarded and images decoded as the server's Prometheus counters count them, times
the backbone FLOPs per row and the VAE decoder's per image, against a 2048² matmul of the
same dtype measured in this run on as many threads.

    python benchmarks/vs_diffusers.py --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler
from engine_batching import body, closed_loop, machine, server
from torch.utils.flop_counter import FlopCounterMode

from denoised.models.checkpoints.model_dir import load_model_dir

CONCURRENCY = (1, 4, 16)
DTYPES = ("float32", "bfloat16")
# DiT-S/2 (Peebles & Xie, 2023): 12 layers, hidden 384, 6 heads, 1000 classes, learned sigma.
DIT_S2 = dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, in_channels=4,
              out_channels=8, patch_size=2, num_embeds_ada_norm=1000)  # fmt: skip
# An 8x decoder far smaller than SD's, so the backbone (what is compared) dominates.
SMALL_VAE = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)  # fmt: skip
GUIDANCE = body(1, 0, text=False)["guidance_scale"]


def write_pipeline(folder: Path, latent_side: int) -> None:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=latent_side, **DIT_S2)
    # One timestep/label embedder for all blocks, as in the released checkpoints.
    shared = transformer.transformer_blocks[0].norm1.emb.state_dict()
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    vae = AutoencoderKL(**SMALL_VAE)
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000
    )
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(folder)


def convert(pipeline: Path, out: Path) -> None:
    command = [sys.executable, "-m", "denoised.server.cli", "convert", str(pipeline), str(out)]
    subprocess.run(command, check=True)


def diffusers_rate(pipe: DiTPipeline, concurrency: int, requests: int, steps: int) -> float:
    """Images/s of `concurrency` clients each making `requests` pipeline calls in a row."""

    def client(index: int) -> None:
        for k in range(requests):
            seed = index * 1000 + k
            scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
            call = DiTPipeline(pipe.transformer, pipe.vae, scheduler)
            call.set_progress_bar_config(disable=True)
            label = int(body(steps, seed, text=False)["label"])
            call(class_labels=[label], guidance_scale=GUIDANCE, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(seed), output_type="np")  # fmt: skip

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return concurrency * requests / (time.perf_counter() - started)


def denoised_rate(url: str, concurrency: int, requests: int, steps: int) -> float:
    """Images/s of `concurrency` HTTP clients each sending `requests` requests in a row."""

    async def run() -> None:
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:

            async def client(index: int) -> None:
                for k in range(requests):
                    response = await http.post(
                        "/v1/generate", json=body(steps, index * 1000 + k, text=False)
                    )
                    response.raise_for_status()

            await asyncio.gather(*(client(i) for i in range(concurrency)))

    started = time.perf_counter()
    asyncio.run(run())
    return concurrency * requests / (time.perf_counter() - started)


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a size² matmul on this process's threads (best of three timings)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * size**3 / best


def model_flops(model_dir: Path) -> tuple[float, float]:
    """FLOPs of one backbone row (one sample at one evaluation) and of one image's VAE
    decode, counted by torch."""
    loaded = load_model_dir(model_dir)
    assert loaded.vae is not None  # the pipeline written above has one
    x = torch.randn(1, *loaded.latent_shape)
    with torch.inference_mode(), FlopCounterMode(display=False) as backbone:
        loaded.backbone(x, torch.tensor([500.0]), torch.tensor([1]))
    with torch.inference_mode(), FlopCounterMode(display=False) as vae:
        loaded.vae.decode(x)
    return float(backbone.get_total_flops()), float(vae.get_total_flops())


def saturated_work(
    url: str, concurrency: int, steps: int, warmup: float, seconds: float
) -> tuple[float, float]:
    """(rows/s, images/s) the server forwards and decodes under `concurrency` closed-loop
    clients, over `seconds` after `warmup` (from its own counters)."""
    load = closed_loop(url, [steps] * concurrency, warmup, seconds, text=False)
    _, _, rates = asyncio.run(load)
    return rates["denoised_batch_samples_sum"], rates["denoised_images_total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--latent", type=int, default=16, help="latent side (16: 128 px)")
    parser.add_argument("--steps", type=int, default=10, help="DPM-Solver++ steps per image")
    parser.add_argument("--requests", type=int, nargs=3, default=(3, 2, 1),
                        help="requests per client at concurrency 1, 4, 16")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="rounds per pair (median)")
    parser.add_argument("--saturation", type=int, nargs="+", default=(16, 48),
                        help="closed-loop concurrencies for the utilisation")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds before the window")
    parser.add_argument("--seconds", type=float, default=30.0, help="utilisation window")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; {args.threads} threads on both sides")
    print(f"DiT-S/2 on {args.latent}x{args.latent}x4 latents, {args.steps} DPM-Solver++ steps, "
          f"guidance {GUIDANCE:g}, small 8x VAE decode\n")  # fmt: skip
    requests = dict(zip(CONCURRENCY, args.requests, strict=True))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        pipeline_dir, model_dir = Path(tmp, "pipeline"), Path(tmp, "dit-s-2")
        write_pipeline(pipeline_dir, args.latent)
        convert(pipeline_dir, model_dir)
        urls = {
            dtype: stack.enter_context(
                server(str(model_dir), "cpu", args.threads, "--dtype", dtype, "--max-batch", "64")
            )
            for dtype in DTYPES
        }
        rates: dict[tuple[str, int, str], list[float]] = {}
        for dtype in DTYPES:
            pipe = DiTPipeline.from_pretrained(pipeline_dir, torch_dtype=getattr(torch, dtype))
            diffusers_rate(pipe, 1, 1, args.steps)  # first calls: lazy initialisation
            denoised_rate(urls[dtype], 1, 1, args.steps)
            for _ in range(args.rounds):
                for c in CONCURRENCY:
                    n, url = requests[c], urls[dtype]
                    rates.setdefault((dtype, c, "diffusers"), []).append(
                        diffusers_rate(pipe, c, n, args.steps)
                    )
                    rates.setdefault((dtype, c, "denoised"), []).append(
                        denoised_rate(url, c, n, args.steps)
                    )
        work = {
            (dtype, c): saturated_work(urls[dtype], c, args.steps, args.warmup, args.seconds)
            for dtype in DTYPES
            for c in args.saturation
        }
        matmul = {dtype: matmul_rate(getattr(torch, dtype)) for dtype in DTYPES}
        row_flops, vae_flops = model_flops(model_dir)

    median = {key: statistics.median(values) for key, values in rates.items()}
    print("| dtype | concurrency | diffusers DiTPipeline (images/s) | denoised serve (images/s) "
          "| ratio |\n|---|---|---|---|---|")  # fmt: skip
    for dtype in DTYPES:
        for c in CONCURRENCY:
            ours, theirs = median[(dtype, c, "denoised")], median[(dtype, c, "diffusers")]
            print(f"| {dtype} | {c} | {theirs:.3f} | {ours:.3f} | {ours / theirs:.2f}x |")
    base = median[("float32", 16, "diffusers")]
    print(f"\nconcurrency 16, denoised bfloat16 over diffusers float32 (its default): "
          f"{median[('bfloat16', 16, 'denoised')] / base:.2f}x")  # fmt: skip
    print(f"\nbackbone {row_flops / 1e9:.2f} GFLOP per row ({2 * args.steps} rows per image), "
          f"VAE decode {vae_flops / 1e9:.2f} GFLOP per image; closed loop, "
          f"{args.seconds:g} s after {args.warmup:g} s")  # fmt: skip
    print("| dtype | 2048² matmul (GFLOP/s) | concurrency | rows/s | images/s "
          "| engine (GFLOP/s) | utilisation |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for (dtype, c), (rows, images) in work.items():
        engine = rows * row_flops + images * vae_flops
        print(f"| {dtype} | {matmul[dtype] / 1e9:.0f} | {c} | {rows:.1f} | {images:.2f} | "
              f"{engine / 1e9:.0f} | {engine / matmul[dtype]:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
