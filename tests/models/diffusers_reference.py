"""Tiny diffusers reference models with random weights, and the original DiT layout."""

import numpy as np
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

HEADS, HEAD_DIM, LAYERS, SIDE, PATCH, CLASSES = 2, 16, 2, 8, 2, 10

TINY_VAE = {
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "latent_channels": 4,
}
# Stable Diffusion 3's VAE settings (Esser et al., 2024), for the tiny layout.
SD3_VAE = {
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def random_diffusers_dit(seed: int = 0) -> DiTTransformer2DModel:
    """A tiny diffusers DiT with random weights everywhere and one shared embedder (as in the
    released checkpoints, whose per-block embedder copies are identical)."""
    torch.manual_seed(seed)
    ref = DiTTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=LAYERS,
        sample_size=SIDE,
        patch_size=PATCH,
        num_embeds_ada_norm=CLASSES,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
        shared = ref.transformer_blocks[0].norm1.emb.state_dict()
        for block in ref.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return ref


def inputs(batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, SIDE, SIDE, generator=g)
    t = torch.rand(batch, generator=g) * 999  # per-sample, fractional
    y = torch.randint(0, CLASSES + 1, (batch,), generator=g)
    y[0] = CLASSES  # the null label
    return x, t, y


def assert_close(ours: torch.Tensor, ref: torch.Tensor):
    scale = ref.abs().max().item()
    assert scale > 0.1
    assert (ours - ref).abs().max().item() <= 1e-5 * scale


def original_pos_embed(dim: int, grid: int) -> np.ndarray:
    """The original release's table, written out independently in numpy (float64)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)


def original_layout(ref: DiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """The diffusers weights under the original DiT release's names (with its pos_embed)."""
    sd = ref.state_dict()
    emb = "transformer_blocks.0.norm1.emb."
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd[emb + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[emb + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[emb + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[emb + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
        "pos_embed": torch.from_numpy(original_pos_embed(HEADS * HEAD_DIM, SIDE // PATCH)).float()[
            None
        ],
    }
    for i in range(LAYERS):
        b = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [sd[b + f"attn1.to_{x}.{kind}"] for x in "qkv"]
            )
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[b + f"attn1.to_out.0.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[b + f"ff.net.0.proj.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[b + f"ff.net.2.{kind}"]
            out[f"blocks.{i}.adaLN_modulation.1.{kind}"] = sd[b + f"norm1.linear.{kind}"]
    return out


def patch_to_original_settings(ref: DiTTransformer2DModel) -> None:
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6  # the LayerNorm before the MLP


def randomised(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """`model` in eval mode with every parameter redrawn from N(0, std²): diffusers
    zero-initialises some output layers, which would hide their mistakes."""
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def random_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return randomised(AutoencoderKL(**{**TINY_VAE, **overrides}))
