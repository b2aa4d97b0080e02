"""DiT against diffusers' DiTTransformer2DModel (both lineages), shapes and per-sample batching."""

import pytest
import torch
from diffusers_reference import (
    CLASSES,
    HEADS,
    LAYERS,
    SIDE,
    assert_close,
    inputs,
    original_layout,
    original_pos_embed,
    patch_to_original_settings,
    random_diffusers_dit,
)

from denoised.models.backbones.dit import DiT, DiTBlock, DiTConfig, dit_config
from denoised.models.backbones.embeddings import sincos_2d
from denoised.models.checkpoints.convert import (
    convert_original_checkpoint,
    dit_config_from_diffusers,
    dit_from_original_state_dict,
    dit_state_dict_from_diffusers,
)
from denoised.models.checkpoints.model_dir import load_model_dir


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


@pytest.mark.parametrize("lineage", ["diffusers", "original"])
def test_block_mlp_norm_eps_matches_both_lineages(lineage):
    """On a near-zero residual stream the MLP LayerNorm's eps dominates, so only the right
    setting (diffusers 1e-5, original 1e-6) reproduces the reference block."""
    ref = random_diffusers_dit(seed=4)
    if lineage == "original":
        patch_to_original_settings(ref)
    eps = 1e-5 if lineage == "diffusers" else 1e-6
    ref_block, width = ref.transformer_blocks[0], HEADS * 16
    with torch.no_grad():  # a zero attention gate (as at adaLN-Zero init) keeps the stream tiny
        ref_block.norm1.linear.weight[2 * width : 3 * width] = 0
        ref_block.norm1.linear.bias[2 * width : 3 * width] = 0
    state = dit_state_dict_from_diffusers(ref.state_dict())
    x, t, y = inputs(seed=6)
    tokens = torch.randn(x.shape[0], 16, width) * 1e-3
    with torch.no_grad():
        expected = ref_block(tokens, timestep=t, class_labels=y)
        c = ref_block.norm1.emb(t, y, hidden_dtype=torch.float32)
        for candidate in (eps, 1e-5 if eps == 1e-6 else 1e-6):
            block = DiTBlock(width, HEADS, 4.0, candidate)
            block.load_state_dict(
                {
                    k.removeprefix("blocks.0."): v
                    for k, v in state.items()
                    if k.startswith("blocks.0.")
                }
            )
            close = (block(tokens, c) - expected).abs().max() <= 1e-5 * expected.abs().max()
            assert bool(close) == (candidate == eps)
