"""muP beside sp: sp unchanged, muP equal to sp at its base width, its scales, per-layer learning rates,
bad input, and the coordinate check (activation sizes flat in width under muP, growing under sp)."""

import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from mup import MuAdamW, set_base_shapes
from test_dit import public_xl2_shapes, randomize

from harness.model.dit import CONDS, PARAMETRIZATIONS, DiT, DiT_models, build, load_checkpoint, validate_arch
from harness.model.flops import fvcore_macs
from harness.model.mup import COORD_LR, ROLES, SP_GROUP, coord_check, layer_roles, param_groups

# Off-paper small size: 8x8 latents with 4 channels, patch 2 -> 16 tokens, 4 heads, 2 blocks.
SMALL = dict(depth=2, num_heads=4, input_size=8, in_channels=4, num_classes=10)
BASE = 64


def small(cond="adaln_zero", width=BASE, parametrization="sp", base=None, **overrides):
    return build("demo", 2, cond, hidden_size=width, parametrization=parametrization, mup_base_width=base,
                 **{**SMALL, **overrides})


def seeded(make, seed=0):
    torch.manual_seed(seed)
    return make()


def inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def train_steps(model, groups_lr=1e-3, steps=2, seed=0):
    """Returns the loss of each of `steps` AdamW steps (param_groups, foreach) on a fixed batch."""
    opt = torch.optim.AdamW(param_groups(model, groups_lr, 0.01), lr=groups_lr, weight_decay=0.01, foreach=True)
    x, t, y = inputs(seed=seed)
    losses = []
    for _ in range(steps):
        loss = model(x, t, y, force_drop_ids=torch.zeros_like(y)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


# ---- sp is unchanged ----

@pytest.mark.parametrize("cond", CONDS)
def test_sp_is_the_default_model_bit_for_bit(cond):
    reference = seeded(lambda: DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=BASE, depth=2,
                                   num_heads=4, num_classes=10, cond=cond))
    assert same_state(seeded(lambda: small(cond)), reference)
    assert same_state(seeded(lambda: build("demo", 2, cond, hidden_size=BASE, **SMALL)), reference)
    # the numbers sp passes: the usual attention scale, a readout multiplier of exactly 1
    assert reference.width_mult == 1.0 and reference.final_layer.linear.output_mult == 1.0
    assert all(b.attn.scale == 1 / math.sqrt(BASE // 4) for b in reference.blocks)


def test_sp_attention_is_the_default_scaled_dot_product_bit_for_bit():
    attn = randomize(small()).blocks[0].attn
    x = torch.randn(2, 5, BASE)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, BASE // 4).permute(2, 0, 3, 1, 4)
    expected = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, BASE))
    assert torch.equal(attn(x), expected)


def test_sp_param_groups_are_what_plain_adamw_gets(one_thread):
    model = seeded(lambda: small())
    (group,) = param_groups(model, 1e-4, 0.0)
    assert group["name"] == SP_GROUP and (group["lr"], group["weight_decay"]) == (1e-4, 0.0)
    assert len(group["params"]) == len(list(model.parameters()))
    assert all(a is b for a, b in zip(group["params"], model.parameters()))
    # and training with them is bit for bit the trainer's AdamW(model.parameters(), ...)
    plain, grouped = randomize(seeded(lambda: small())), randomize(seeded(lambda: small()))
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
    x, t, y = inputs()
    for _ in range(2):
        loss = plain(x, t, y, force_drop_ids=torch.zeros_like(y)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_steps(grouped)
    assert same_state(plain, grouped)


def test_released_checkpoint_names_load_strictly_into_sp_and_mup():
    with torch.device("meta"):
        sp = DiT_models["DiT-XL/2"]()
        mup = DiT_models["DiT-XL/2"](parametrization="mup", mup_base_width=384)
    assert {k: tuple(v.shape) for k, v in sp.state_dict().items()} == public_xl2_shapes()  # no new entries
    assert sp.state_dict().keys() == mup.state_dict().keys()  # the multipliers are numbers, not buffers
    load_checkpoint(sp.state_dict(), mup)  # strict
    load_checkpoint(mup.state_dict(), sp)


# ---- muP ----

@pytest.mark.parametrize("cond", CONDS)
def test_mup_at_its_base_width_is_sp_bit_for_bit(cond, one_thread):
    sp = seeded(lambda: small(cond))
    mup = seeded(lambda: small(cond, parametrization="mup", base=BASE))
    assert same_state(sp, mup)  # the same init from the same seed
    x, t, y = inputs()
    sp, mup = randomize(sp), randomize(mup)
    keep = torch.zeros_like(y)
    assert torch.equal(sp(x, t, y, force_drop_ids=keep), mup(x, t, y, force_drop_ids=keep))
    # the same training: its param groups differ from sp's only in how they are split
    assert [g["name"] for g in param_groups(mup, 1.0)] == list(ROLES)
    assert all(g["lr"] == 1.0 for g in param_groups(mup, 1.0))
    assert torch.equal(torch.stack(train_steps(sp)), torch.stack(train_steps(mup)))
    assert same_state(sp, mup)


@pytest.mark.parametrize("cond", ["adaln_zero", "cross_attn"])
def test_mup_attention_scale_is_one_over_head_dim(cond):
    width = 4 * BASE  # head dim 64; the base model (same 4 heads) has head dim 16
    model = randomize(small(cond, width, "mup", BASE))
    expected_scale = math.sqrt(BASE // 4) / (width // 4)  # sqrt(base head dim) / head dim = 1/16
    assert model.blocks[0].attn.scale == pytest.approx(expected_scale, rel=1e-15)
    if cond == "cross_attn":
        assert model.blocks[0].cross_attn.scale == pytest.approx(expected_scale, rel=1e-15)
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, width)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, width // 4).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * expected_scale).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, width))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn.logits(x), q @ k.transpose(-2, -1) * expected_scale)


@pytest.mark.parametrize("cond", ["adaln_zero", "in_context"])
def test_mup_readout_multiplier_and_init(cond):
    width = 4 * BASE
    model = seeded(lambda: small(cond, width, "mup", BASE))
    readout = model.final_layer.linear
    assert readout.output_mult == 1 / 4 and torch.count_nonzero(readout.weight) == 0  # zero init kept
    randomize(model)
    h = torch.randn(3, 7, width)
    torch.testing.assert_close(readout(h), F.linear(h / 4, readout.weight, readout.bias))
    # input layer: the base model's xavier bound (fan_in 16 + base fan_out 64), not the wide model's
    fresh = seeded(lambda: small(cond, width, "mup", BASE))
    w = fresh.x_embedder.proj.weight
    bound = math.sqrt(6 / (16 + BASE))
    assert 0.95 * bound < w.abs().max().item() <= bound * (1 + 1e-6)
    # the timestep MLP's hidden layer: std 0.02 / sqrt(width_mult)
    assert fresh.t_embedder.mlp[2].weight.std().item() == pytest.approx(0.02 / 2, rel=0.02)
    assert fresh.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.03)  # input: unchanged


# The layer table of docs/mup.md: every parameter name of every variant falls in exactly one row.
ROLE_TABLE = [
    (r"x_embedder\.proj\.weight|t_embedder\.mlp\.0\.weight|y_embedder\.embedding_table\.weight", "input"),
    (r"t_embedder\.mlp\.2\.weight|blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1"
     r"|cross_attn\.(q|kv|proj))\.weight|final_layer\.adaLN_modulation\.1\.weight", "hidden"),
    (r"final_layer\.linear\.weight", "output"),
    (r".*\.bias|.*norm.*\.weight|pos_embed", "vector"),
]


@pytest.mark.parametrize("cond", CONDS)
def test_layer_roles_follow_the_table(cond):
    for parametrization, base in (("sp", None), ("mup", BASE)):
        roles = layer_roles(small(cond, 2 * BASE, parametrization, base))
        for name, role in roles.items():
            rows = [r for pattern, r in ROLE_TABLE if re.fullmatch(pattern, name)]
            assert rows == [role], (name, role, rows)


def test_mup_learning_rates_follow_one_over_width_mult_as_in_mup_adamw():
    width, lr, wd = 4 * BASE, 1e-3, 0.1
    model = small("adaln_zero", width, "mup", BASE)
    groups = {g["name"]: g for g in param_groups(model, lr, wd)}
    assert list(groups) == list(ROLES)
    assert (groups["hidden"]["lr"], groups["hidden"]["weight_decay"]) == (pytest.approx(lr / 4), pytest.approx(wd * 4))
    assert all((groups[r]["lr"], groups[r]["weight_decay"]) == (lr, wd) for r in ("input", "output", "vector"))
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    # the mup package's own rule gives every parameter the same learning rate
    twin = copy.deepcopy(model)
    with torch.device("meta"):
        base, delta = small("adaln_zero", BASE, "mup", BASE), small("adaln_zero", 2 * BASE, "mup", BASE)
    # do_assert=False: the package checks that the readout is its own MuReadout class; ours is models.Readout
    set_base_shapes(twin, base, delta=delta, rescale_params=False, do_assert=False)
    theirs = {id(p): g["lr"] for g in MuAdamW(twin.parameters(), lr=lr).param_groups for p in g["params"]}
    ours = {name: g["lr"] for g in groups.values() for name, p in model.named_parameters()
            if any(p is q for q in g["params"])}
    for (name, _), p in zip(model.named_parameters(), twin.parameters()):
        assert ours[name] == pytest.approx(theirs[id(p)]), name


@pytest.mark.parametrize("kwargs, words", [
    (dict(parametrization="xyz"), ["parametrization='xyz'", "allowed: sp, mup"]),
    (dict(parametrization="mup"), ["mup_base_width=None", "a multiple of num_heads 4 from 4 to hidden_size 64"]),
    (dict(parametrization="mup", mup_base_width=128), ["mup_base_width=128 > hidden_size 64"]),
    (dict(parametrization="mup", mup_base_width=30), ["mup_base_width=30", "not a multiple of num_heads 4"]),
    (dict(parametrization="mup", mup_base_width=0), ["mup_base_width=0"]),
    (dict(parametrization="mup", mup_base_width=32.0), ["mup_base_width=32.0"]),
    (dict(parametrization="sp", mup_base_width=32), ["mup_base_width=32", "only used with parametrization='mup'"]),
])
def test_bad_parametrization_is_a_value_error_naming_the_value_and_the_choices(kwargs, words):
    assert set(PARAMETRIZATIONS) == {"sp", "mup"}
    arch = dict(input_size=8, in_channels=4, depth=1, hidden_size=64, num_heads=4, num_classes=10)
    for make in (lambda: build("demo", 2, "adaln_zero", **arch, **kwargs),
                 lambda: DiT(patch_size=2, **arch, **kwargs)):
        with pytest.raises(ValueError) as err:
            make()
        assert all(word in str(err.value) for word in words), str(err.value)
    errors = validate_arch("demo", 2, "adaln_zero", 8, 64, 4, **kwargs)
    assert len(errors) == 1 and all(word in errors[0] for word in words)


def test_mup_builds_on_the_meta_device_with_the_same_multiply_adds():
    arch = dict(input_size=8, in_channels=4, depth=1, hidden_size=128, num_heads=4, num_classes=10)
    with torch.device("meta"):
        sp = build("demo", 2, "adaln_zero", **arch).eval()
        mup = build("demo", 2, "adaln_zero", parametrization="mup", mup_base_width=32, **arch).eval()
        x = (torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    assert fvcore_macs(mup, x) == fvcore_macs(sp, x) > 0  # the multipliers are elementwise, not counted


# ---- the coordinate check ----

def test_coord_check_mup_is_flat_in_width_and_sp_grows(tmp_path, one_thread):
    # Widths 32..256 (x8), base 32, 2 AdamW steps, 1 seed. Growth factor = size at 256 / size at 32. A
    # layer whose update grows like width (sp's hidden weights and readout) gives ~8; muP's should give ~1.
    # Measured over seeds 0-3 after 2 steps: readout sp 7.5-8.4 vs mup 0.74-1.0; adaLN modulation (the
    # first hidden layer a step moves: zero at init, so its output is the update alone) sp 2.84-2.89 vs mup
    # 0.99-1.0. The thresholds below leave a factor >= 1.4 of margin on each side.
    record = coord_check(tmp_path, (32, 64, 128, 256), base_width=32, steps=2, lr=COORD_LR, seeds=(0,))
    assert (tmp_path / "coord_check.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "coord_check.json").read_text())["sizes"] == record["sizes"]

    def growth(parametrization, group, step=2):
        sizes = record["sizes"][parametrization][group][step]
        return sizes[-1] / sizes[0]

    assert growth("sp", "readout") > 4 and 0.5 < growth("mup", "readout") < 1.5
    assert growth("sp", "adaLN modulation") > 2 and 0.7 < growth("mup", "adaLN modulation") < 1.4
    # every other muP activation is flat too (attention logits excepted: at init q and k are independent,
    # so q.k / head_dim shrinks like width^-1/2; it must not grow)
    for group in record["sizes"]["mup"]:
        if group != "attention logits":
            assert 0.5 < growth("mup", group) < 2, group
    assert growth("mup", "attention logits") < 1
