"""CPU forward time of each preset backbone (and its VAE decode) per batch size.

Weights are seeded random (no download). For each preset and batch size it prints the mean
seconds per forward, the seconds per sample, and the per-sample speed-up over batch size 1
measured in the same run. Not a test; timings depend on the machine and its load.

    python benchmarks/backbones_cpu.py                       # small presets, batches 1 2 4
    python benchmarks/backbones_cpu.py --vae --batch-sizes 1   # with the 256 px VAE decode
    python benchmarks/backbones_cpu.py --presets dit-xl-2-256 --batch-sizes 1 --repeats 1
    python benchmarks/backbones_cpu.py --presets sd3-medium-depth2 --batch-sizes 1 --repeats 1
"""

from __future__ import annotations

import argparse
import time

import torch

from denoised.models.backbones.mmdit import MMDiTConfig
from denoised.models.checkpoints.presets import PRESET_NAMES, build_preset, build_preset_vae
from denoised.models.conditioning import TextContext

SD3_TEXT_TOKENS = 77 + 256


def seconds_per_call(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, lazy initialisation
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def conditioning(arch, n: int) -> torch.Tensor | TextContext | None:
    """Random class ids, or random prompt encodings for a text-conditioned backbone (SD3's
    77 CLIP + 256 T5 tokens)."""
    if isinstance(arch, MMDiTConfig):
        tokens = torch.randn(n, SD3_TEXT_TOKENS, arch.joint_attention_dim)
        return TextContext(tokens, pooled=torch.randn(n, arch.pooled_projection_dim))
    return torch.randint(0, 1000, (n,)) if getattr(arch, "num_classes", None) else None


def bench_preset(name: str, batch_sizes: list[int], repeats: int, vae: bool) -> None:
    backbone, config = build_preset(name)
    backbone.eval()
    arch = backbone.config
    channels = arch.in_channels
    side = getattr(arch, "input_size", None) or arch.sample_size
    params = sum(p.numel() for p in backbone.parameters()) / 1e6
    print(f"\n{name}: {params:.1f}M parameters, input {channels}x{side}x{side}")
    print(f"{'part':>8} {'batch':>5} {'s/forward':>10} {'s/sample':>9} {'vs batch 1':>10}")
    decoder = build_preset_vae(config) if vae else None
    parts = [("backbone", backbone)] + ([("vae", decoder.eval())] if decoder is not None else [])
    for part, module in parts:
        per_sample_at_1 = None
        for n in batch_sizes:
            x = torch.randn(n, channels, side, side)
            t = torch.rand(n) * 999
            y = conditioning(arch, n)

            def call(module=module, x=x, t=t, y=y, part=part):
                with torch.inference_mode():
                    return module(x, t, y) if part == "backbone" else module.decode(x)

            seconds = seconds_per_call(call, repeats)
            per_sample = seconds / n
            per_sample_at_1 = per_sample_at_1 or per_sample
            print(
                f"{part:>8} {n:>5} {seconds:>10.4f} {per_sample:>9.4f}"
                f" {per_sample_at_1 / per_sample:>9.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["dit-s-2-256", "dit-b-2-256", "unet-ddpm-cifar10-32"],
        choices=PRESET_NAMES,
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--vae", action="store_true", help="also time the VAE decode (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, CPU")
    for name in args.presets:
        bench_preset(name, args.batch_sizes, args.repeats, vae=args.vae)


if __name__ == "__main__":
    main()
