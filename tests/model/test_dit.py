"""DiT model zoo: shapes, zero init, guidance, label dropout, public checkpoint names, loader, bad input."""

import math

import pytest
import torch

from harness.model.dit import (
    CONDS,
    MODEL_SIZES,
    PATCH_SIZES,
    DiT,
    DiT_models,
    build,
    get_2d_sincos_pos_embed,
    load_checkpoint,
    validate_arch,
)

# Off-paper tiny size: 8x8 latents with 4 channels, patch 2 -> 16 tokens, width 32, 2 heads, 2 blocks.
TINY = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=4, num_classes=10)


def tiny(cond="adaln_zero", patch=2, **overrides):
    return build("S", patch, cond, **{**TINY, **overrides})


def randomize(model, seed=0, std=0.2):
    """Returns model with every trainable weight redrawn, so no zero init hides a broken path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(n=3, channels=4, size=8, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, t, y


def test_fresh_adaln_zero_outputs_exactly_zero():
    model = tiny("adaln_zero").eval()
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)  # learn_sigma: eps and v
    assert torch.count_nonzero(out) == 0
    # and the blocks start as the identity: every adaLN-Zero gate is exactly zero
    assert all(torch.count_nonzero(b.adaLN_modulation[-1].weight) == 0 for b in model.blocks)


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
def test_patchify_unpatchify_round_trip(patch):
    model = tiny(patch=patch) if patch in PATCH_SIZES else DiT(
        input_size=8, patch_size=patch, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    x = torch.randn(2, model.out_channels, 8, 8)
    tokens = model.patchify(x)
    assert tokens.shape == (2, (8 // patch) ** 2, patch * patch * model.out_channels)
    assert torch.equal(model.unpatchify(tokens), x)
    # token 1 is the second patch of the first row, laid out (p, q, c) as the final linear layer emits it
    if patch < 8:
        expected = x[:, :, :patch, patch:2 * patch].permute(0, 2, 3, 1).reshape(2, -1)
        assert torch.equal(tokens[:, 1], expected)


def test_patch_embed_is_the_public_conv():
    model = randomize(tiny(patch=4))
    x = torch.randn(2, 4, 8, 8)
    conv = model.x_embedder.proj(x).flatten(2).transpose(1, 2)  # the public code's PatchEmbed
    torch.testing.assert_close(model.x_embedder(x), conv, rtol=1e-5, atol=1e-5)


def test_attention_is_softmax_qk_v_in_timm_layout():
    attn = randomize(tiny()).blocks[0].attn
    x = torch.randn(2, 5, 32)
    N, T, D, H = 2, 5, 32, 2
    q, k, v = attn.qkv(x).reshape(N, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(N, T, D))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_timestep_and_position_embeddings_follow_the_public_formulas():
    model = tiny()
    t_freq = model.t_embedder.timestep_embedding(torch.tensor([0.0, 10.0]), 256)
    assert torch.equal(t_freq[0], torch.cat([torch.ones(128), torch.zeros(128)]))  # cos half, then sin half
    assert t_freq[1, 0].item() == pytest.approx(math.cos(10.0)) and t_freq[1, 128].item() == pytest.approx(
        math.sin(10.0))
    pos = torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float()
    assert torch.equal(model.pos_embed[0], pos)
    assert not model.pos_embed.requires_grad
    # position (row 0, column 1): the first half encodes the column (w goes first in the meshgrid)
    assert pos[1, 0].item() == pytest.approx(math.sin(1.0)) and pos[1, 16].item() == 0.0


@pytest.mark.parametrize("cond", CONDS)
def test_every_variant_runs_forward_and_backward(cond):
    model = randomize(tiny(cond)).train()
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert model.pos_embed.grad is None
    # the conditioning reaches the output: another label or timestep changes it
    model.eval()
    with torch.no_grad():
        base = model(x, t, y)
        assert not torch.allclose(base, model(x, t, (y + 1) % 10))
        assert not torch.allclose(base, model(x, (t + 500) % 1000, y))


@pytest.mark.parametrize("cond", CONDS)
def test_output_patches_line_up_with_input_patches(cond):
    # Without blocks, output patch j sees input patch j only: the in-context tokens are dropped, not kept.
    model = randomize(tiny(cond, depth=0)).eval()
    x, t, y = inputs()
    x2 = x.clone()
    x2[:, :, :2, :2] += 1.0  # patch 0 only
    with torch.no_grad():
        changed = (model(x2, t, y) - model(x, t, y)).abs().sum(dim=(0, 1)) > 0  # (H, W)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(changed, expected)


def test_variants_have_their_own_block_classes():
    names = {cond: type(tiny(cond).blocks[0]).__name__ for cond in CONDS}
    assert len(set(names.values())) == 4
    assert not hasattr(tiny("in_context").final_layer, "adaLN_modulation")
    assert not hasattr(tiny("cross_attn").final_layer, "adaLN_modulation")
    assert tiny("adaln").blocks[0].adaLN_modulation[-1].out_features == 4 * 32  # no gates
    assert tiny("adaln_zero").blocks[0].adaLN_modulation[-1].out_features == 6 * 32


def test_learn_sigma_false_outputs_only_eps():
    model = tiny(learn_sigma=False)
    x, t, y = inputs()
    assert model.out_channels == 4 and model(x, t, y).shape == (3, 4, 8, 8)


@pytest.mark.parametrize("cond", ["adaln_zero", "in_context"])
def test_gradient_checkpointing_gives_the_same_gradients(cond):
    torch.manual_seed(0)
    plain = randomize(tiny(cond)).train()
    ckpt = randomize(tiny(cond, grad_checkpoint=True)).train()
    x, t, y = inputs()
    for model in (plain, ckpt):
        model.y_embedder.dropout_prob = 0.0  # both must see the same labels
        model(x, t, y).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def cfg_batch(model, n=2):
    x, t, y = inputs(n)
    x2 = torch.cat([x, x])
    t2 = torch.cat([t, t])
    y2 = torch.cat([y, torch.full_like(y, model.null_label)])
    return x, t, y, x2, t2, y2


def test_guidance_scale_one_equals_the_conditional_output():
    model = randomize(tiny()).eval()
    x, t, y, x2, t2, y2 = cfg_batch(model)
    with torch.no_grad():
        guided = model.forward_with_cfg(x2, t2, y2, cfg_scale=1.0)
        cond = model(x, t, y)
    assert guided.shape == (4, 8, 8, 8)
    torch.testing.assert_close(guided[:2], cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[2:, :4], cond[:, :4], rtol=1e-5, atol=1e-5)  # guided eps in both halves


def test_guidance_on_three_channels_leaves_channel_3_unguided():
    model = randomize(tiny()).eval()
    x, t, y, x2, t2, y2 = cfg_batch(model)
    scale = 4.0
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, model.null_label))
        public = model.forward_with_cfg(x2, t2, y2, scale, cfg_channels=3)
        full = model.forward_with_cfg(x2, t2, y2, scale)
    guided = uncond + scale * (cond - uncond)
    torch.testing.assert_close(public[:2, :3], guided[:, :3], rtol=1e-4, atol=1e-4)
    # Not bitwise: the doubled batch of forward_with_cfg runs the kernels on other shapes than the plain calls,
    # and whether two batch shapes round alike depends on the CPU. Channel 3 keeps each half's own output...
    torch.testing.assert_close(public[:2, 3], cond[:, 3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(public[2:, 3], uncond[:, 3], rtol=1e-4, atol=1e-5)
    # ...which the guided combination is not (scale 4 moves it far beyond that tolerance)
    assert not torch.allclose(public[:2, 3], guided[:, 3], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(full[:2, :4], guided[:, :4], rtol=1e-4, atol=1e-4)  # default: every channel
    assert not torch.allclose(full[:2, 3], cond[:, 3])
    torch.testing.assert_close(full[:2, 4:], cond[:, 4:])  # the variance is never guided
    with pytest.raises(ValueError, match="cfg_channels=5"):
        model.forward_with_cfg(x2, t2, y2, scale, cfg_channels=5)


def test_label_dropout_and_null_label_live_in_the_label_embedder():
    model = randomize(tiny(class_dropout_prob=0.5))
    emb = model.y_embedder
    assert model.null_label == emb.null_label == 10
    assert emb.embedding_table.num_embeddings == 11
    y = torch.arange(10)
    assert torch.equal(emb.drop_labels(y, p=1.0), torch.full_like(y, 10))
    assert torch.equal(emb.drop_labels(y, p=0.0), y)
    force = (torch.arange(10) % 2 == 0).long()
    assert torch.equal(emb.drop_labels(y, force_drop_ids=force), torch.where(force == 1, 10, y))
    torch.manual_seed(0)
    dropped = emb.drop_labels(torch.zeros(4000, dtype=torch.long))
    assert 0.45 < (dropped == 10).float().mean().item() < 0.55
    # the model takes a drop mask drawn elsewhere (the trainer's generator), in train or eval mode
    model.eval()
    x, t, _ = inputs(n=2)
    labels = torch.tensor([3, 4])
    mask = torch.tensor([True, False])
    torch.testing.assert_close(model(x, t, labels, force_drop_ids=mask), model(x, t, torch.tensor([10, 4])))
    # train mode drops, eval mode never does
    emb.dropout_prob = 1.0
    assert torch.equal(emb(y, train=True), emb.embedding_table.weight[[10] * 10])
    assert torch.equal(emb(y, train=False), emb.embedding_table.weight[:10])


# Public DiT-XL/2 (facebookresearch/DiT, DiT-XL-2-256x256.pt), written out from the architecture facts:
# width 1152, 28 blocks, 16 heads, patch 2 on 4x32x32 latents (256 tokens), MLP 4608, 1000 classes + null,
# learn_sigma (8 output channels), 256-d timestep frequencies. LayerNorms have no affine: no entries.
def public_xl2_shapes():
    d, mlp, tokens, p, c_in, c_out = 1152, 4608, 256, 2, 4, 8
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, c_in, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (1001, d),
        "final_layer.linear.weight": (p * p * c_out, d), "final_layer.linear.bias": (p * p * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(28):
        shapes.update({
            f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (mlp, d), f"blocks.{i}.mlp.fc1.bias": (mlp,),
            f"blocks.{i}.mlp.fc2.weight": (d, mlp), f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        })
    return shapes


def test_xl2_state_dict_has_the_public_names_and_shapes_and_loads_strictly():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
        other = DiT_models["DiT-XL/2"]()
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == public_xl2_shapes()
    assert not model.pos_embed.requires_grad
    assert load_checkpoint(state, other) is state  # strict: any missing or extra name raises


def test_checkpoint_round_trip_through_a_file(tmp_path):
    model = randomize(tiny())
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": randomize(tiny(), seed=1).state_dict(), "step": 7}, path)
    fresh = tiny()
    load_checkpoint(path, fresh, key="model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    ema = load_checkpoint(path)  # default key "ema"
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # the released checkpoints are bare state dicts
    assert load_checkpoint(tmp_path / "bare.pt").keys() == model.state_dict().keys()
    ddp = {f"module.{k}": v for k, v in model.state_dict().items()}
    load_checkpoint(ddp, tiny())


def test_checkpoint_mismatch_is_a_clear_error():
    state = tiny().state_dict()
    with pytest.raises(ValueError, match=r"shape mismatch: .*x_embedder\.proj\.weight"):
        load_checkpoint(state, tiny(patch=4))
    with pytest.raises(ValueError, match=r"missing: .*blocks\.2\."):
        load_checkpoint(state, tiny(depth=3))
    with pytest.raises(ValueError, match=r"unexpected: .*adaLN_modulation"):
        load_checkpoint(state, tiny("in_context"))
    with pytest.raises(ValueError, match=r"no state dict under key 'ema'.*'model'"):
        load_checkpoint({"model": state, "step": 3})


def test_registry_and_build_cover_the_grid():
    assert set(DiT_models) == {f"DiT-{m}/{p}" for m in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    with torch.device("meta"):
        model = DiT_models["DiT-B/4"](input_size=16, in_channels=3, num_classes=5, learn_sigma=False,
                                      class_dropout_prob=0.2, cond="cross_attn")
    assert (len(model.blocks), model.patch_size, model.blocks[0].attn.num_heads) == (12, 4, 12)
    assert (model.in_channels, model.out_channels, model.num_classes, model.null_label) == (3, 3, 5, 5)
    assert model.pos_embed.shape == (1, 16, 768) and model.cond == "cross_attn"
    assert MODEL_SIZES["XL"] == dict(depth=28, hidden_size=1152, num_heads=16)


@pytest.mark.parametrize("kwargs, words", [
    (dict(model="M", depth=None), ["'M'", "S, B, L, XL", "depth, hidden_size and num_heads"]),
    (dict(model="XXL", hidden_size=None), ["'XXL'", "S, B, L, XL"]),
    (dict(patch=3), ["3", "2, 4, 8"]),
    (dict(cond="film"), ["'film'", "in_context, cross_attn, adaln, adaln_zero"]),
    (dict(patch=8, input_size=12), ["patch 8", "input_size 12", "[2, 4]"]),
    (dict(hidden_size=30, num_heads=4), ["num_heads 4", "hidden_size 30"]),
])
def test_bad_architecture_is_a_value_error_naming_the_value_and_the_choices(kwargs, words):
    args = dict(model="S", patch=2, cond="adaln_zero", input_size=8, depth=1, hidden_size=32, num_heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        build(args.pop("model"), args.pop("patch"), args.pop("cond"), **args)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_off_paper_sizes_need_a_name_and_every_dimension():
    model = build("demo-S", 2, "adaln", **TINY)
    assert (len(model.blocks), model.x_embedder.proj.out_channels) == (2, 32)
    assert validate_arch("demo-S", 2, "adaln", 8, hidden_size=32, num_heads=2) == []
    assert "unknown model 'demo-S'" in validate_arch("demo-S", 2, "adaln", 8)[0]


def test_validate_arch_reports_every_problem_at_once():
    errors = validate_arch("XXL", 3, "film", 32)
    assert len(errors) == 3
    assert validate_arch("XL", 2, "adaln_zero", 32) == []
    assert validate_arch("XL", 2, "adaln_zero", None) == []  # input size unknown (bad data set): no crash
    assert validate_arch("S", 8, "adaln", 36) == [
        "patch 8 does not divide input_size 36; patches that do: [2, 4]"]

