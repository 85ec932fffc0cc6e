"""Parameters and compute of DiT models, in the paper's convention, checked against Table 4.

Convention (DiT paper, and the authors on the public repository's issue tracker): `gflops` counts one
multiply-add as one flop (MACs), for one forward pass of one image through the transformer (VAE excluded), attention
matmuls QK^T and AV included. Real FLOPs are 2x that. Training compute = gflops x batch x steps x 3
(backward ~ 2x forward). Parameters are the trainable ones: the fixed sin-cos pos_embed is left out,
which is what makes adaLN XL/2 600M (not 601M) in Table 4.

What is counted, with fvcore's FlopCountAnalysis: linear / matmul / conv multiply-adds (fvcore's own
handlers), `aten::scaled_dot_product_attention` (a handler added here: fvcore skips it silently, e.g.
XL/4 28.8 instead of 29.05), and one multiply-add per LayerNorm element (the normalise step; an affine
scale and shift is elementwise, like the adaLN modulate, and not counted; fvcore's default estimate of
4-5 per element overcounts XL/2 by 0.05 and adaLN XL/2 by 0.054). Elementwise ops (modulate, gates, GELU,
softmax, residual adds) are not counted. With this, all 12 adaLN-Zero rows and the 3 other XL/2 variants
of Table 4 at 256x256 are reproduced to the printed 2 decimals, except B/4 (5.5664 vs 5.56: the matmuls
alone give 5.5652, so no LayerNorm convention reaches 5.56); XL/2 at 512x512 gives 524.6055 (524.60).

    python -m harness.model.flops [--model S B] [--patch 2] [--cond adaln_zero] [--input-size 32] [--json]
                            [--compare-paper]
"""

import functools
import json
import sys
import warnings
from math import prod

import torch

from harness.core import cli
from harness.core.compute import (  # noqa: F401 - re-exported: the accounting of the paper's units lives there
    paper_table,
    real_flops_per_image,
    sampling_gflops_per_image,
    train_compute_gflops,
    train_flops,
)
from harness.data.codec import SD_VAE_GEOMETRY
from harness.model.dit import (
    COND_TOKENS,
    CONDS,
    FREQ_EMBED_DIM,
    MLP_RATIO,
    MODEL_SIZES,
    PATCH_SIZES,
    build,
    resolve_size,
    validate_arch,
)

# Pixel resolution / latent size of the SD VAE (256x256 images -> 4x32x32 latents): only used to match
# a latent input_size to the paper's `resolution` column.
LATENT_DOWNSAMPLE = SD_VAE_GEOMETRY[1]

# Ops fvcore leaves uncounted on purpose (elementwise or lookups, not multiply-adds of the paper's
# convention). Any other unsupported op is a silent undercount and raises: e.g. a new attention kernel.
_UNCOUNTED_OPS = {
    "aten::add", "aten::sub", "aten::rsub", "aten::mul", "aten::div", "aten::exp", "aten::cos",
    "aten::sin", "aten::silu", "aten::gelu", "aten::softmax", "aten::embedding", "aten::neg",
}


#################################################################################
#                       Counting: fvcore and closed form                        #
#################################################################################

def _import_fvcore():
    """Returns fvcore's FlopCountAnalysis and get_shape, imported quietly (it warns about torch.jit) and only
    when a count traces: the plan counts in closed form and need not load fvcore."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn.jit_handles import get_shape
    return FlopCountAnalysis, get_shape


def _sdpa_flop_jit(inputs, outputs):
    """fvcore handle: multiply-adds of softmax(Q K^T) V, i.e. N*heads*Tq*Tk*(head_dim + value_dim)."""
    get_shape = _import_fvcore()[1]
    q, k, v = (get_shape(inputs[i]) for i in range(3))
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _layer_norm_flop_jit(inputs, outputs):
    """fvcore handle: one multiply-add per normalised element, affine or not (see the module docstring)."""
    get_shape = _import_fvcore()[1]
    return prod(get_shape(inputs[0]))


def _resolve(model, patch, cond, input_size, depth, hidden_size, num_heads):
    """Returns (depth, hidden_size, num_heads) of a cell; raises ValueError naming any bad value."""
    errors = validate_arch(model, patch, cond, input_size, hidden_size, num_heads)
    if errors:
        raise ValueError("; ".join(errors))
    size = resolve_size(model, depth, hidden_size, num_heads)
    return size["depth"], size["hidden_size"], size["num_heads"]


def fvcore_macs(module, inputs):
    """Returns the multiply-adds fvcore counts for module(*inputs), with the SDPA and LayerNorm handlers;
    raises RuntimeError if fvcore skipped an op that is not elementwise (a silent undercount)."""
    FlopCountAnalysis = _import_fvcore()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit tracer warnings
        analysis = FlopCountAnalysis(module, inputs).set_op_handle(
            "aten::scaled_dot_product_attention", _sdpa_flop_jit,
            "aten::layer_norm", _layer_norm_flop_jit,
        )
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        macs = analysis.total()
    skipped = set(analysis.unsupported_ops()) - _UNCOUNTED_OPS
    if skipped:
        raise RuntimeError(f"fvcore skipped {sorted(skipped)}: add a handler or the count is too low")
    return macs


def _fvcore_count(depth, **arch):
    """Returns (trainable params, MACs) of one model built on the meta device and traced with fvcore."""
    with torch.device("meta"):
        model = build(depth=depth, **arch).eval()
        size = arch["input_size"]
        inputs = (torch.zeros(1, arch["in_channels"], size, size), torch.zeros(1),
                  torch.zeros(1, dtype=torch.long))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return params, fvcore_macs(model, inputs)


@functools.cache
def _count(model, patch, cond, input_size, in_channels, num_classes, learn_sigma, depth, hidden_size,
           num_heads):
    """Returns (params, MACs) of a cell, cached per argument tuple.

    The blocks are identical, so both counts are affine in depth: tracing depth 1 and depth 2 gives the
    full model exactly (tests check it against a full trace) at a small fraction of the tracing time.
    """
    depth, hidden_size, num_heads = _resolve(model, patch, cond, input_size, depth, hidden_size, num_heads)
    arch = dict(model=model, patch=patch, cond=cond, input_size=input_size, in_channels=in_channels,
                num_classes=num_classes, learn_sigma=learn_sigma, hidden_size=hidden_size,
                num_heads=num_heads)
    if depth <= 2:
        return _fvcore_count(depth, **arch)
    params_1, macs_1 = _fvcore_count(1, **arch)
    params_2, macs_2 = _fvcore_count(2, **arch)
    return params_1 + (depth - 1) * (params_2 - params_1), macs_1 + (depth - 1) * (macs_2 - macs_1)


def count_params(model="XL", patch=2, cond="adaln_zero", *, input_size=32, in_channels=4, num_classes=1000,
                 learn_sigma=True, depth=None, hidden_size=None, num_heads=None):
    """Returns the number of trainable parameters (pos_embed, which is fixed, excluded)."""
    return _count(model, patch, cond, input_size, in_channels, num_classes, learn_sigma, depth, hidden_size,
                  num_heads)[0]


def gflops_fvcore(model="XL", patch=2, cond="adaln_zero", *, input_size=32, in_channels=4, num_classes=1000,
                  learn_sigma=True, depth=None, hidden_size=None, num_heads=None):
    """Returns Gflops (1e9 multiply-adds, one forward pass, one image) counted by fvcore (meta device)."""
    return _count(model, patch, cond, input_size, in_channels, num_classes, learn_sigma, depth, hidden_size,
                  num_heads)[1] / 1e9


def gflops_closed_form(model="XL", patch=2, cond="adaln_zero", *, input_size=32, in_channels=4,
                       num_classes=1000, learn_sigma=True, depth=None, hidden_size=None, num_heads=None):
    """Returns Gflops (1e9 multiply-adds, one forward pass, one image) from the architecture's formula."""
    depth, d, _ = _resolve(model, patch, cond, input_size, depth, hidden_size, num_heads)
    out_channels = in_channels * 2 if learn_sigma else in_channels
    mlp = int(d * MLP_RATIO)
    T = (input_size // patch) ** 2
    S = COND_TOKENS
    Tb = T + S if cond == "in_context" else T  # tokens the blocks see
    # Patch embedding, timestep MLP (label embedding is a lookup: free).
    macs = T * in_channels * patch * patch * d + FREQ_EMBED_DIM * d + d * d
    # Per block: qkv + proj + MLP, attention matmuls, two LayerNorms, then what the variant adds.
    block = Tb * (3 * d * d + d * d + 2 * d * mlp) + 2 * Tb * Tb * d + 2 * Tb * d
    if cond == "adaln_zero":
        block += d * 6 * d              # shift, scale, gate for both branches
    elif cond == "adaln":
        block += d * 4 * d              # shift, scale for both branches
    elif cond == "cross_attn":
        block += T * d * d + S * d * 2 * d + 2 * T * S * d + T * d * d  # q, kv, attention, proj
    macs += depth * block
    # Final layer: LayerNorm, (adaptive: shift and scale from c), linear to p*p*out_channels.
    macs += T * d + T * d * patch * patch * out_channels
    if cond in ("adaln", "adaln_zero"):
        macs += d * 2 * d
    return macs / 1e9


def params_closed_form(model="XL", patch=2, cond="adaln_zero", *, input_size=32, in_channels=4,
                       num_classes=1000, learn_sigma=True, depth=None, hidden_size=None, num_heads=None):
    """Returns the trainable parameter count from the architecture's formula (pos_embed, fixed, excluded)."""
    depth, d, _ = _resolve(model, patch, cond, input_size, depth, hidden_size, num_heads)
    out_channels = in_channels * 2 if learn_sigma else in_channels
    mlp = int(d * MLP_RATIO)
    n = in_channels * patch * patch * d + d                 # patch embedding (a conv with bias)
    n += FREQ_EMBED_DIM * d + d + d * d + d                  # timestep MLP
    n += (num_classes + 1) * d                               # label table with the null label
    block = 4 * d * d + 4 * d + 2 * d * mlp + mlp + d        # qkv + proj, MLP
    block += {"adaln_zero": 6 * d * d + 6 * d,               # shift, scale, gate of both branches
              "adaln": 4 * d * d + 4 * d,                    # shift, scale of both branches
              "cross_attn": 4 * d + 4 * d * d + 4 * d,       # two affine LNs; q, kv, proj of the cross-attention
              "in_context": 4 * d}[cond]                     # two affine LNs
    n += depth * block
    n += d * patch * patch * out_channels + patch * patch * out_channels  # final linear
    n += 2 * d * d + 2 * d if cond in ("adaln", "adaln_zero") else 2 * d  # adaptive or affine final LN
    return n


COUNTERS = ("fvcore", "closed_form")


def model_cost(model="XL", patch=2, cond="adaln_zero", *, input_size=32, in_channels=4, num_classes=1000,
               learn_sigma=True, depth=None, hidden_size=None, num_heads=None, counter="fvcore"):
    """Returns dict(params=int, gflops=float, tokens=int): trainable params, paper-convention Gflops, T.

    counter="fvcore" traces the model (the reference, seconds per new architecture); "closed_form" uses the
    formulas above (microseconds; equal to fvcore to 1e-12 on every cell of the grid, checked by the tests),
    which is what the sweep's plan uses so that planning a 48-cell grid is instant.
    """
    arch = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma,
                depth=depth, hidden_size=hidden_size, num_heads=num_heads)
    if counter == "closed_form":
        params = params_closed_form(model, patch, cond, **arch)
        gflops = gflops_closed_form(model, patch, cond, **arch)
    elif counter == "fvcore":
        params, macs = _count(model, patch, cond, input_size, in_channels, num_classes, learn_sigma, depth,
                              hidden_size, num_heads)
        gflops = macs / 1e9
    else:
        raise ValueError(f"counter={counter!r}; allowed: {', '.join(COUNTERS)}")
    return dict(params=params, gflops=gflops, tokens=(input_size // patch) ** 2)


#################################################################################
#                         The paper's table and the CLI                         #
#################################################################################

def _paper_lookup():
    """Returns {(model, patch, cond, input_size): (gflops, params_m)} from Table 4."""
    out = {}
    for row in paper_table():
        key = (row["model"], row["patch"], row["cond"], row["resolution"] // LATENT_DOWNSAMPLE)
        out.setdefault(key, (row["gflops"], row["params_m"]))  # rows repeat per training length
    return out


def cost_table(models=tuple(MODEL_SIZES), patches=PATCH_SIZES, conds=CONDS, input_sizes=(32,),
               compare_paper=False):
    """Returns one record per (model, patch, cond, input size): params, params_m, gflops, tokens, ..."""
    paper = _paper_lookup() if compare_paper else {}
    records = []
    for input_size in input_sizes:
        for model in models:
            for patch in patches:
                for cond in conds:
                    cost = model_cost(model, patch, cond, input_size=input_size)
                    record = dict(model=model, patch=patch, cond=cond, input_size=input_size,
                                  tokens=cost["tokens"], params=cost["params"],
                                  params_m=round(cost["params"] / 1e6, 3), gflops=round(cost["gflops"], 4),
                                  gflops_closed_form=round(gflops_closed_form(
                                      model, patch, cond, input_size=input_size), 4))
                    if compare_paper:
                        record.update(_paper_columns(record, paper.get((model, patch, cond, input_size))))
                    records.append(record)
    return records


def _paper_columns(record, paper_row):
    """Returns Table 4 gflops and params_m for a record and our differences (None where not in Table 4)."""
    if paper_row is None:
        return dict(paper_gflops=None, paper_params_m=None, gflops_diff=None, params_m_diff=None)
    paper_gflops, paper_params_m = paper_row
    return dict(paper_gflops=paper_gflops, paper_params_m=paper_params_m,
                gflops_diff=round(record["gflops"] - paper_gflops, 4),
                params_m_diff=round(record["params"] / 1e6 - paper_params_m, 3))


def _format(records):
    """Returns the records as an aligned text table."""
    columns = [c for c in records[0] if c != "params"] if records else []
    cells = [[("-" if r[c] is None else str(r[c])) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


@cli.guard
def main(argv=None):
    """`python -m harness.model.flops`: the params and Gflops table; bad input is one line, exit 2."""
    parser = cli.ArgumentParser(prog="python -m harness.model.flops",
                                description="Params and Gflops (multiply-adds, forward, one image) "
                                            "of every DiT model x patch x cond.")
    parser.add_argument("--model", nargs="+", choices=list(MODEL_SIZES), default=list(MODEL_SIZES))
    parser.add_argument("--patch", nargs="+", type=int, choices=PATCH_SIZES, default=list(PATCH_SIZES))
    parser.add_argument("--cond", nargs="+", choices=CONDS, default=list(CONDS))
    parser.add_argument("--input-size", nargs="+", type=int, default=[32],
                        help="latent side length (32 for 256x256 images)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of records")
    parser.add_argument("--compare-paper", action="store_true", help="add Table 4's numbers and differences")
    args = parser.parse_args(argv)
    not_positive = [size for size in args.input_size if size < 1]
    if not_positive:
        parser.error(f"argument --input-size: {not_positive} must be positive")
    indivisible = [size for size in args.input_size if any(size % p for p in args.patch)]
    if indivisible:
        parser.error(f"argument --input-size: {indivisible} not divisible by every --patch {args.patch}")
    records = cost_table(args.model, args.patch, args.cond, args.input_size, args.compare_paper)
    print(json.dumps(records, indent=1) if args.json else _format(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
