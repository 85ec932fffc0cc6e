"""muP for DiT: the per-layer AdamW learning rates, and the coordinate check that shows it works.

The model side (attention logit scale, readout multiplier, initial scales) is decided in
harness.model.dit.DiT from `parametrization` and `mup_base_width`; this module gives the optimiser its
param groups and measures the result. docs/mup.md has the layer table and the measured numbers.

Which dimensions of a parameter grow with width is found the way the `mup` package finds it
(`make_base_shapes`): by comparing the shapes of two copies of the architecture, at the base width and
at twice it, built on the meta device (no memory, no init cost). The learning-rate rule is `mup.MuAdamW`'s
(Yang et al. 2022, "Tensor Programs V", Table 3, Adam column): a matrix whose fan-in and fan-out both grow
("hidden") gets lr / width_mult, everything else the base lr. The groups are built here, named, and
handed to the trainer's own torch AdamW (fused or foreach), instead of calling MuAdamW, which needs `infshape`
attributes on the Parameter objects (dropped by copy.deepcopy, so the EMA copy and any rebuilt model lose
them) and returns unnamed groups.

    python -m harness.model.mup coord-check --out docs/figures [--widths 64 128 256 512 1024] [--steps 4]
"""

import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from mup import get_shapes, make_base_shapes, zip_infshapes

from harness.core import cli
from harness.diffusion import create_diffusion
from harness.model.dit import PARAMETRIZATIONS, DiT, Readout

# How muP treats a parameter (TP5 Table 3), in the order param_groups lists them:
#   input:  weight from a fixed-size input to the width (patch embedding, timestep MLP's first layer,
#           label table): base lr, init independent of width.
#   hidden: weight from width to width (qkv, proj, fc1, fc2, adaLN modulation, timestep MLP's second layer,
#           cross-attention): lr / width_mult, init variance ~ 1 / fan_in.
#   output: weight from the width to a fixed size (the final linear layer): base lr, 1 / width_mult multiplier.
#   vector: biases, LayerNorm affine, and the fixed pos_embed (no gradient): base lr.
ROLES = ("input", "hidden", "output", "vector")
SP_GROUP = "all"  # the single group of the standard parametrization


def _infshapes(model):
    """Returns {parameter name: mup.InfShape} for model: each dimension marked as growing with width or not,
    with its base size (mup's make_base_shapes on meta-device copies at the base width and twice it)."""
    base = model.mup_base_width or model.arch["hidden_size"]  # sp: the model is its own base
    with torch.device("meta"):
        base_shapes, delta_shapes = (get_shapes(DiT(**{**model.arch, "hidden_size": w})) for w in (base, 2 * base))
    return zip_infshapes(make_base_shapes(base_shapes, delta_shapes), model)


def layer_roles(model):
    """Returns {parameter name: role}, role one of ROLES, for every parameter of a DiT (either
    parametrization: the classification depends on shapes only). Raises RuntimeError if a layer maps the
    width to a fixed size without being a Readout (it would lack muP's output multiplier)."""
    infshapes = _infshapes(model)
    modules = dict(model.named_modules())
    roles = {}
    for name in dict(model.named_parameters()):
        shape, module = infshapes[name], modules[name.rpartition(".")[0]]
        is_matrix = name.endswith("weight") and isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding))
        if shape.ninf() == 2:
            roles[name] = "hidden"
        elif shape.ninf() == 1 and is_matrix:
            # Linear / Conv weights are (fan_out, fan_in, ...); an Embedding's is (num_embeddings, dim): its
            # fan-in is the one-hot label, its fan-out the width.
            fan_in_grows = shape[0].isinf() if isinstance(module, nn.Embedding) else shape[1].isinf()
            roles[name] = "output" if fan_in_grows else "input"
            if fan_in_grows and not isinstance(module, Readout):
                raise RuntimeError(f"{name} maps the width to a fixed size but is not a Readout")
        else:
            roles[name] = "vector"
    return roles


def param_groups(model, lr, weight_decay=0.0):
    """Returns the AdamW param groups of a (bare, unwrapped) DiT: a list of dicts with keys name, params,
    lr, weight_decay, covering every parameter once.

    sp: one group "all" holding model.parameters() in order at lr and weight_decay: exactly what
    torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay) builds, plus the name.
    mup: one group per role (ROLES order, each in model.parameters() order); "hidden" at lr / width_mult
    and weight_decay * width_mult (AdamW decays by lr * weight_decay per step: kept as at the base width,
    as mup.MuAdamW does), the others at lr and weight_decay.
    """
    if not isinstance(model, DiT):
        raise TypeError(f"param_groups needs the bare DiT (before DDP or torch.compile), got {type(model).__name__}")
    if model.parametrization == "sp":
        return [dict(name=SP_GROUP, params=list(model.parameters()), lr=lr, weight_decay=weight_decay)]
    roles = layer_roles(model)
    named = dict(model.named_parameters())
    groups = []
    for role in ROLES:
        mult = model.width_mult if role == "hidden" else 1.0
        params = [named[name] for name in named if roles[name] == role]
        if params:
            groups.append(dict(name=role, params=params, lr=lr / mult, weight_decay=weight_decay * mult))
    return groups


#################################################################################
#                    Coordinate check (TP5 Appendix D.1)                        #
#################################################################################
# Train copies of a small DiT of increasing width for a few Adam steps on one fixed batch and record the
# mean |x| of each layer's output. Under muP every curve is flat in width; under sp the layers trained
# through a growing fan-in (hidden weights, readout) grow like width^1 after the first step.

COORD_WIDTHS = (64, 128, 256, 512, 1024)
COORD_BASE_WIDTH = 64
COORD_STEPS = 4
# A large learning rate, so that a handful of steps shows what the updates do with width (at 1e-3 the
# slopes have the same signs, but are smaller; docs/mup.md has both).
COORD_LR = 1e-2
COORD_SEEDS = (0, 1, 2)  # the sizes are averaged over these (model init and batch)
# A small model: 8x8 inputs, 4 channels, patch 2 (16 tokens), 2 blocks, 4 heads (head dim grows with width,
# so muP's 1/head_dim attention scaling is exercised), 10 classes, no label dropout (no randomness).
COORD_ARCH = dict(input_size=8, patch_size=2, in_channels=4, depth=2, num_heads=4, num_classes=10,
                  class_dropout_prob=0.0, cond="adaln_zero")
COORD_BATCH = 16

# Group of layers -> the module names whose output it averages (attention logits: Attention.logits).
ACTIVATION_GROUPS = {
    "patch embed": r"x_embedder",
    "timestep embed": r"t_embedder",
    "adaLN modulation": r"blocks\.\d+\.adaLN_modulation",
    "attention logits": r"blocks\.\d+\.attn",
    "attention out": r"blocks\.\d+\.attn",
    "MLP out": r"blocks\.\d+\.mlp",
    "block out": r"blocks\.\d+",
    "readout": r"final_layer",
}


def _record_activations(model, sizes):
    """Registers forward hooks that append mean |x| of each group's outputs to sizes[group]; returns the
    hook handles."""
    handles = []
    for name, module in model.named_modules():
        for group, pattern in ACTIVATION_GROUPS.items():
            if not re.fullmatch(pattern, name):
                continue
            if group == "attention logits":
                def hook(module, inputs, output, group=group):
                    sizes[group].append(module.logits(inputs[0]).abs().mean().item())
            else:
                def hook(module, inputs, output, group=group):
                    sizes[group].append(output.abs().mean().item())
            handles.append(module.register_forward_hook(hook))
    return handles


def coord_data(parametrization, widths=COORD_WIDTHS, *, base_width=COORD_BASE_WIDTH, steps=COORD_STEPS,
               lr=COORD_LR, seed=0, batch=COORD_BATCH):
    """Returns {group: array (steps + 1, len(widths))} of mean |activation| in each group of
    ACTIVATION_GROUPS (averaged over the group's layers), at the forward pass after 0..steps AdamW steps
    with param_groups(model, lr) on one fixed batch and the DDPM training loss."""
    diffusion = create_diffusion("")
    g = torch.Generator().manual_seed(seed)
    c, s = COORD_ARCH["in_channels"], COORD_ARCH["input_size"]
    x = torch.randn(batch, c, s, s, generator=g)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g)
    y = torch.randint(0, COORD_ARCH["num_classes"], (batch,), generator=g)
    noise = torch.randn(batch, c, s, s, generator=g)
    mup_base = base_width if parametrization == "mup" else None
    out = {group: np.zeros((steps + 1, len(widths))) for group in ACTIVATION_GROUPS}
    for j, width in enumerate(widths):
        torch.manual_seed(seed)
        model = DiT(hidden_size=width, parametrization=parametrization, mup_base_width=mup_base, **COORD_ARCH)
        opt = torch.optim.AdamW(param_groups(model, lr), lr=lr, weight_decay=0.0)
        for step in range(steps + 1):
            sizes = {group: [] for group in ACTIVATION_GROUPS}
            handles = _record_activations(model, sizes)
            loss = diffusion.training_losses(model, x, t, {"y": y}, noise=noise)["loss"].mean()
            for handle in handles:
                handle.remove()
            for group, values in sizes.items():
                out[group][step, j] = np.mean(values)
            if step < steps:
                opt.zero_grad()
                loss.backward()
                opt.step()
    return out


def slopes(widths, sizes):
    """Returns {group: [slope per step]}: the least-squares slope of log(size) against log(width), or None
    where a size is 0 (zero-initialised outputs before the first step)."""
    logw = np.log(np.asarray(widths, dtype=float))
    result = {}
    for group, values in sizes.items():
        result[group] = [float(np.polyfit(logw, np.log(row), 1)[0]) if np.all(row > 0) else None
                         for row in values]
    return result


def plot_coord_check(widths, sizes, title, path):
    """Saves a figure to path: mean |activation| against width (log-log), one row per parametrization
    (sizes: {parametrization: {group: (steps + 1, widths) array}}), one column per step from 1 (step 0 is
    the init, where adaLN-Zero's modulation and readout are exactly 0), one line per layer group; one y
    scale for all panels, so the rows compare directly."""
    # Imported here: the trainer imports this module, and a training job draws no figure.
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    rows = list(sizes)
    steps = next(iter(sizes[rows[0]].values())).shape[0] - 1
    fig, axes = plt.subplots(len(rows), steps, figsize=(3.1 * steps + 1.8, 2.9 * len(rows)), sharex=True,
                             sharey=True, squeeze=False)
    after = [v[1:] for by_group in sizes.values() for v in by_group.values()]
    lo, hi = min(v[v > 0].min() for v in after), max(v.max() for v in after)
    colors = plt.get_cmap("tab10").colors
    for i, parametrization in enumerate(rows):
        for k, ax in enumerate(axes[i], start=1):
            for color, (group, values) in zip(colors, sizes[parametrization].items()):
                ax.plot(widths, values[k], marker="o", markersize=3, color=color, label=group)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_ylim(lo / 2, hi * 2)
            ax.set_xticks(widths, [str(w) for w in widths], fontsize=8)
            ax.minorticks_off()
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{parametrization}: after {k} Adam step{'s' if k > 1 else ''}", fontsize=10)
            if i == len(rows) - 1:
                ax.set_xlabel("width (hidden_size)")
        axes[i, 0].set_ylabel("mean |activation|")
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def coord_check(out_dir, widths=COORD_WIDTHS, *, base_width=COORD_BASE_WIDTH, steps=COORD_STEPS, lr=COORD_LR,
                seeds=COORD_SEEDS):
    """Runs the coordinate check under both parametrizations, sizes averaged over seeds; writes
    coord_check.png and coord_check.json (sizes per parametrization, group, step and width; slopes) to
    out_dir; returns the JSON record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    record = dict(widths=list(widths), base_width=base_width, steps=steps, lr=lr, seeds=list(seeds),
                  arch=COORD_ARCH, batch=COORD_BATCH, statistic="mean |x| of the layer output, mean over seeds",
                  sizes={}, slopes={})
    sizes = {}
    for parametrization in PARAMETRIZATIONS:
        runs = [coord_data(parametrization, widths, base_width=base_width, steps=steps, lr=lr, seed=seed)
                for seed in seeds]
        sizes[parametrization] = {group: np.mean([run[group] for run in runs], axis=0) for group in runs[0]}
        record["sizes"][parametrization] = {g: v.tolist() for g, v in sizes[parametrization].items()}
        record["slopes"][parametrization] = slopes(widths, sizes[parametrization])
    title = (f"Coordinate check: DiT (adaLN-Zero) depth {COORD_ARCH['depth']}, {COORD_ARCH['num_heads']} heads, "
             f"AdamW lr {lr:g}; mup base width {base_width}; mean of {len(seeds)} seeds")
    plot_coord_check(widths, sizes, title, out_dir / "coord_check.png")
    record["wall_s"] = round(time.monotonic() - start, 1)
    (out_dir / "coord_check.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


@cli.guard
def _main(argv=None):
    """`python -m harness.model.mup coord-check ...`; bad input is one line, exit 2."""
    parser = cli.ArgumentParser(prog="python -m harness.model.mup", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{coord-check}")
    cc = sub.add_parser("coord-check", help="activation size against width under sp and mup; plots and JSON")
    cc.add_argument("--out", required=True, help="folder for coord_check.png and coord_check.json")
    cc.add_argument("--widths", type=int, nargs="+", default=list(COORD_WIDTHS))
    cc.add_argument("--base-width", type=int, default=COORD_BASE_WIDTH)
    cc.add_argument("--steps", type=int, default=COORD_STEPS)
    cc.add_argument("--lr", type=float, default=COORD_LR)
    cc.add_argument("--seeds", type=int, nargs="+", default=list(COORD_SEEDS))
    args = parser.parse_args(argv)
    heads = COORD_ARCH["num_heads"]
    bad_widths = [w for w in args.widths if w < heads or w % heads]
    if bad_widths:
        cc.error(f"argument --widths: {bad_widths}; allowed: multiples of the {heads} heads")
    if len(set(args.widths)) < 2:
        cc.error(f"argument --widths: {args.widths}; allowed: at least two different widths (a slope needs two)")
    if args.base_width < heads or args.base_width % heads or args.base_width > min(args.widths):
        cc.error(f"argument --base-width: {args.base_width}; allowed: a multiple of the {heads} heads from {heads} "
                 f"to the smallest width {min(args.widths)}")
    if args.steps < 1:
        cc.error(f"argument --steps: {args.steps}; allowed: an integer >= 1")
    if not args.lr > 0:
        cc.error(f"argument --lr: {args.lr}; allowed: a positive learning rate")
    if any(seed < 0 for seed in args.seeds):
        cc.error(f"argument --seeds: {args.seeds}; allowed: integers >= 0")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        cc.error(f"argument --out: {args.out} is a file; allowed: a folder (created when missing)")
    record = coord_check(args.out, args.widths, base_width=args.base_width, steps=args.steps, lr=args.lr,
                         seeds=args.seeds)
    last = args.steps
    print(f"slope of log mean|x| vs log width after {last} steps ({record['wall_s']} s):")
    print(f"  {'group':<18} {'sp':>6} {'mup':>6}")
    for group in ACTIVATION_GROUPS:
        sp, mup = (record["slopes"][p][group][last] for p in PARAMETRIZATIONS)
        print(f"  {group:<18} {sp:>6.2f} {mup:>6.2f}")


if __name__ == "__main__":
    _main()
