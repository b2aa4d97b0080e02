"""Tiny random-weight model directories, written through the real `save_model_dir` (real
safetensors + config.json), for the server and end-to-end tests."""

from pathlib import Path

import torch

from denoised.models.backbones.dit import DiT, DiTConfig
from denoised.models.backbones.mmdit import MMDiT, MMDiTConfig
from denoised.models.backbones.vae import VAEConfig, VAEDecoder
from denoised.models.checkpoints.model_dir import save_model_dir
from denoised.models.checkpoints.presets import DDPM_LINEAR_PROCESS

VP = DDPM_LINEAR_PROCESS
FLOW = {"type": "flow", "shift": 1.0, "convention": "rf", "num_train_timesteps": 1000,
        "prediction": "velocity"}  # fmt: skip
DIGITS = [str(i) for i in range(10)]


def _dit(channels: int, side: int, learn_sigma: bool, seed: int) -> DiT:
    torch.manual_seed(seed)
    config = DiTConfig(
        input_size=side,
        patch_size=2,
        in_channels=channels,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=len(DIGITS),
        learn_sigma=learn_sigma,
    )
    return DiT(config)


def write_tiny_models(root: Path, latent: bool = False) -> dict[str, Path]:
    """`tiny-dit` (VP, epsilon, learned sigma), `tiny-flow` (rectified flow, velocity), and
    with `latent` also `tiny-latent` (a DiT on 4×4×4 latents with an 8× VAE decoder)."""
    dirs = {
        "tiny-dit": save_model_dir(
            root / "tiny-dit", _dit(1, 8, True, 0), {"process": VP, "class_names": DIGITS}
        ),
        "tiny-flow": save_model_dir(
            root / "tiny-flow", _dit(1, 8, False, 1), {"process": FLOW, "class_names": DIGITS}
        ),
    }
    if latent:
        torch.manual_seed(2)
        vae = VAEDecoder(VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                   norm_num_groups=4, mid_block_add_attention=False))  # fmt: skip
        dirs["tiny-latent"] = save_model_dir(
            root / "tiny-latent",
            _dit(4, 4, True, 3),
            {"process": VP, "class_names": DIGITS, "guided_channels": 3},
            vae=vae,
        )
    return dirs


def write_unnamed_dit(root: Path) -> Path:
    """`tiny-ids`: `tiny-dit`'s architecture and weights (10 classes) without `class_names`."""
    return save_model_dir(root / "tiny-ids", _dit(1, 8, True, 0), {"process": VP})


def write_tiny_text_model(root: Path) -> Path:
    """`tiny-text`: an SD3-layout text-to-image model in pixel space (8×8 RGB, rectified
    flow): a one-block MMDiT with random weights and the tiny CLIP-L, CLIP-G and T5 text
    encoders of `text_fixtures.sd3_pipeline`, copied from that pipeline's saved folder."""
    from text_fixtures import CLIP_G_WIDTH, CLIP_WIDTH, T5_WIDTH, randomize, sd3_pipeline

    pipeline = root / "tiny-sd3-pipeline"
    sd3_pipeline(seed=4).save_pretrained(pipeline)
    config = MMDiTConfig(
        sample_size=8, patch_size=2, in_channels=3, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=(CLIP_WIDTH - 8) + (CLIP_G_WIDTH - 8), pos_embed_max_size=8,
    )  # fmt: skip
    backbone = randomize(MMDiT(config), seed=5)  # adaLN-Zero starts at zero: make it count
    defaults = {"sampler": "euler", "steps": 8, "guidance_scale": 3.0}
    return save_model_dir(
        root / "tiny-text", backbone, {"process": FLOW, "defaults": defaults}, text_from=pipeline
    )
