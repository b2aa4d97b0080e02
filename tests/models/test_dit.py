"""DiT against diffusers' DiTTransformer2DModel (both lineages), shapes and per-sample batching."""

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

from denoised.models.checkpoint import load_model_dir
from denoised.models.convert import (
    convert_original_checkpoint,
    dit_config_from_diffusers,
    dit_from_original_state_dict,
    dit_state_dict_from_diffusers,
)
from denoised.models.dit import DiT, DiTConfig, dit_config
from denoised.models.embeddings import sincos_2d

HEADS, HEAD_DIM, LAYERS, SIDE, PATCH, CLASSES = 2, 16, 2, 8, 2, 10


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


def test_matches_diffusers_through_converter():
    ref = random_diffusers_dit()
    config = dit_config_from_diffusers(dict(ref.config))
    assert (config.freq_shift, config.mlp_norm_eps, config.learn_sigma) == (1.0, 1e-5, True)
    model = DiT(config).eval()
    model.load_state_dict(dit_state_dict_from_diffusers(ref.state_dict()), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        assert_close(model(x, t, y), ref(x, t, y).sample)


def test_converter_rejects_unequal_embedder_copies():
    state = random_diffusers_dit().state_dict()
    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    state[key] = state[key] + 1
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb differs"):
        dit_state_dict_from_diffusers(state)


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


def test_original_checkpoint_converts_and_matches_patched_diffusers(tmp_path):
    ref = random_diffusers_dit(seed=3)
    patch_to_original_settings(ref)
    ema = original_layout(ref)
    # A training checkpoint: the converter must take the EMA weights, not the raw ones.
    raw = {k: torch.randn_like(v) for k, v in ema.items()}
    torch.save({"model": raw, "ema": ema, "opt": {}, "args": None}, tmp_path / "dit.pt")
    convert_original_checkpoint(
        tmp_path / "dit.pt", tmp_path / "model", family="dit", num_heads=HEADS
    )
    loaded = load_model_dir(tmp_path / "model")
    arch = loaded.backbone.config
    assert (arch.freq_shift, arch.mlp_norm_eps, arch.input_size, arch.depth) == (
        0.0,
        1e-6,
        SIDE,
        LAYERS,
    )
    assert loaded.guided_channels == 3 and loaded.num_classes == CLASSES
    assert loaded.config["process"]["prediction"] == "epsilon"
    x, t, y = inputs(seed=5)
    with torch.no_grad():
        assert_close(loaded.backbone(x, t, y), ref(x, t, y).sample)


def test_original_converter_checks_pos_embed():
    state = original_layout(random_diffusers_dit())
    state["pos_embed"] = state["pos_embed"] * 1.01
    with pytest.raises(ValueError, match="pos_embed"):
        dit_from_original_state_dict(state, num_heads=HEADS)


def test_sit_uses_flow_process(tmp_path):
    torch.save(original_layout(random_diffusers_dit()), tmp_path / "sit.pt")
    convert_original_checkpoint(tmp_path / "sit.pt", tmp_path / "m", family="sit", num_heads=HEADS)
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.config["family"] == "sit"
    assert loaded.process.to_config()["convention"] == "sit"


def test_position_table_layout():
    table = sincos_2d(32, 3, 5)
    expected = torch.from_numpy(original_pos_embed(32, 5)).float()  # square reference, 5x5
    assert torch.allclose(sincos_2d(32, 5, 5), expected, atol=1e-6)
    assert table.shape == (15, 32)
    # token (row 2, col 4) encodes its column in the first half and its row in the second
    assert torch.allclose(table[2 * 5 + 4], expected[2 * 5 + 4], atol=1e-6)


def test_batch_rows_are_independent():
    """A batch mixing timesteps and labels gives each row what it would get alone."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5)).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 250.5, 999.0]), torch.tensor([5, 0, 3])
    with torch.no_grad():
        batched = model(x, t, y)
        single = torch.cat([model(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(3)])
        unconditional = model(x, t, None)
        null = model(x, t, torch.full((3,), 5))
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.equal(unconditional, null)


@pytest.mark.parametrize(
    ("name", "millions"), [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458), ("DiT-XL/2", 675)]
)
def test_named_sizes_match_paper_parameter_counts(name, millions):
    """Parameter counts of Peebles & Xie (2023), Table 1 (built on the meta device)."""
    with torch.device("meta"):
        model = DiT(dit_config(name))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - millions) < 0.5


def test_named_config_errors():
    with pytest.raises(ValueError, match="DiT-XXL/2"):
        dit_config("DiT-XXL/2")
    with pytest.raises(ValueError, match="unknown DiTConfig fields"):
        DiTConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        DiT(DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=2))(
            torch.randn(1, 4, 7, 7), torch.zeros(1), None
        )
