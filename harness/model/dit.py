"""DiT: Diffusion Transformers (Peebles & Xie, 2023) with the paper's four conditioning variants.

The adaLN-Zero model keeps the parameter names of facebookresearch/DiT, so its released checkpoints load
strictly. The in-context, cross-attention and adaLN variants (paper section 3.2) were never released;
their exact shape is reconstructed from Table 4 of the paper (see the note above `CONDS`).

Two parametrizations (`PARAMETRIZATIONS`): the paper's standard one, "sp", and "mup", the maximal update
parametrization of Yang et al. (Tensor Programs V, 2022), under which the best learning rate found at a
small base width transfers to wide models (shown for DiT by Zheng et al., 2025). muP changes numbers
only, all decided here at construction: the attention logit scale, the readout multiplier and two
initial scales; the per-layer learning rates live in harness/mup.py. docs/mup.md has the layer table.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harness.core.config import (  # noqa: F401 - the allowed names live with the config that chooses them
    CONDS,
    PARAMETRIZATIONS,
    PATCH_SIZES,
)

# The model grid (paper Table 1). Patch size and conditioning are separate, swept choices.
MODEL_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

# How the three unreleased variants are built. Each choice below is the one that reproduces BOTH the
# Gflops and the parameter count of Table 4 at XL/2 (flops.py states the counting convention: matmul
# and conv multiply-adds plus one multiply-add per LayerNorm element; params exclude the fixed pos_embed):
#   in_context 119.37 / 449M: plain pre-LN ViT blocks (LN with affine) on T + 2 tokens; t and y are two
#     extra tokens (no position embedding) put in front and dropped after the last block; final layer =
#     LN (affine) + linear, not adaptive. Gives 119.3709 / 449.16M.
#   cross_attn 137.62 / 598M: plain pre-LN ViT blocks plus a cross-attention layer after self-attention
#     whose queries come from the image tokens and whose keys/values are projected, in every block, from
#     the length-2 sequence [t, y] (q, kv, proj linears with bias: 4d^2 + 4d params). important: the
#     cross-attention has no LayerNorm of its own; a third LN per block would give 137.628 (rounds to
#     137.63), computing k/v once for all blocks would give 137.471. Same plain final layer.
#     Gives 137.6197 / 597.93M.
#   adaln 118.56 / 600M: adaLN-Zero without the gates, so the modulation regresses 4d (not 6d) values;
#     LN without affine (scale and shift come from c); the final layer stays adaptive (without it the
#     count would be 598M). Gives 118.5639 / 600.45M.
#   adaln_zero 118.64 / 675M: the public model. Gives 118.6382 / 674.83M.
# Not pinned by the numbers: whether the in-context / cross-attention LayerNorms are affine (0.13M params,
# no counted multiply-adds either way); they are, as in the standard ViT block the paper names.
COND_TOKENS = 2         # t and y: the sequence the in-context and cross-attention variants condition on
MLP_RATIO = 4.0         # MLP width / model width
FREQ_EMBED_DIM = 256    # sinusoidal timestep features fed to the timestep MLP
EMBED_INIT_STD = 0.02   # public init std of the label table and of the timestep MLP's weights
# "sp": the paper's standard parametrization. "mup": muP (Yang et al. 2022), relative to a base width.


def modulate(x, shift, scale):
    """Returns x * (1 + scale) + shift, with (N, D) shift and scale broadcast over the tokens of x."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding layers for timesteps, class labels and patches        #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into (N, D) vectors: sinusoidal frequencies, then a 2-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=FREQ_EMBED_DIM):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Returns (N, dim) sinusoidal embeddings (cos half, then sin half) of (N,) possibly fractional t."""
        half = dim // 2
        steps = torch.arange(start=0, end=half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * steps / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """Embeds class labels into (N, D) vectors. The one home of the null label and of label dropout."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        # One extra row, always: the null label num_classes, used by classifier-free guidance. (The public
        # code adds it only when dropout_prob > 0; the trained checkpoints all have it.)
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def null_label(self):
        """Returns the label index that means "no class" (== num_classes)."""
        return self.num_classes

    def drop_labels(self, labels, p=None, force_drop_ids=None):
        """Returns labels with each replaced by the null label with probability p (default dropout_prob),
        or exactly where force_drop_ids == 1 when that is given."""
        p = self.dropout_prob if p is None else p
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < p
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.null_label, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.drop_labels(labels, force_drop_ids=force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Splits (N, C, H, W) into p x p patches and projects each: returns (N, T, D), T = (H / p)^2."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        # The conv with kernel = stride = p, written as patches @ weight: the same product (and the same
        # multiply-add count), but it also traces on the meta device, where PyTorch's conv cannot be
        # jit-traced; that is how flops.py counts XL models without their weights in memory.
        N, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, H/p, W/p, C, p, p)
        x = x.reshape(N, (H // p) * (W // p), C * p * p)                   # (N, T, C*p*p)
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)     # (N, T, D)


#################################################################################
#                         Attention and MLP                                     #
#################################################################################

def attention_scale(head_dim, width_mult=1.0):
    """Returns the factor on the attention logits q.k: 1/sqrt(head_dim) shrunk by 1/sqrt(width_mult).

    width_mult 1 (sp, or muP at its base width) gives exactly the usual 1/sqrt(head_dim) (scaled dot
    product attention's default, bit for bit). Under muP the base model keeps the number of heads, so the
    head dim grows with width_mult and this equals sqrt(base_head_dim) / head_dim: muP's 1/head_dim
    (TP5 section 4: after training q and k are correlated, so q.k grows like head_dim, and only
    1/head_dim keeps the logits O(1)), with the constant that makes it the base model's 1/sqrt(base_head_dim).
    """
    return 1 / math.sqrt(head_dim) / math.sqrt(width_mult)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout, so public weights load)."""

    def __init__(self, dim, num_heads, scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = attention_scale(dim // num_heads) if scale is None else scale  # on the logits q.k
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x):
        """Returns q, k, v, each (N, heads, T, D / heads), of (N, T, D) tokens."""
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def logits(self, x):
        """Returns the (N, heads, T, T) attention logits scale * q k^T (forward never forms them; this is
        for measuring their size, e.g. in harness.model.mup's coordinate check)."""
        q, k, _ = self._heads(x)
        return (q @ k.transpose(-2, -1)) * self.scale

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self._heads(x)                                          # each (N, heads, T, D / heads)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)    # (N, heads, T, D / heads)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens (queries) to a short conditioning sequence (keys, values)."""

    def __init__(self, dim, num_heads, scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = attention_scale(dim // num_heads) if scale is None else scale  # on the logits q.k
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        N, T, D = x.shape
        S, head_dim = context.shape[1], D // self.num_heads
        q = self.q(x).reshape(N, T, self.num_heads, head_dim).transpose(1, 2)          # (N, heads, T, hd)
        kv = self.kv(context).reshape(N, S, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)                                                             # (N, heads, S, hd)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)                   # (N, heads, T, hd)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """Transformer MLP: Linear, tanh-approximated GELU, Linear (names fc1/fc2 as in timm)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


#################################################################################
#             The four DiT blocks (paper section 3.2, Figure 3)                 #
#################################################################################
# Every block is called as block(x, c). `cond_tokens` says whether c is the (N, 2, D) sequence [t, y]
# or the (N, D) vector t + y; `in_sequence` says whether those tokens also ride along in x. attn_scale is
# the factor on the attention logits (None: 1/sqrt(head_dim)); see attention_scale.

class AdaLNZeroBlock(nn.Module):
    """adaLN-Zero block: c regresses shift, scale and a zero-initialised gate for each residual branch."""

    cond_tokens, in_sequence = False, False

    def __init__(self, hidden_size, num_heads, mlp_ratio=MLP_RATIO, attn_scale=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attn_scale)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, 1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class AdaLNBlock(nn.Module):
    """adaLN block: c regresses the LayerNorm shift and scale of both branches; no gates."""

    cond_tokens, in_sequence = False, False

    def __init__(self, hidden_size, num_heads, mlp_ratio=MLP_RATIO, attn_scale=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attn_scale)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 4 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class CrossAttnBlock(nn.Module):
    """Pre-LN ViT block with cross-attention to [t, y] after self-attention (no LN of its own, see CONDS)."""

    cond_tokens, in_sequence = True, False

    def __init__(self, hidden_size, num_heads, mlp_ratio=MLP_RATIO, attn_scale=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attn_scale)
        self.cross_attn = CrossAttention(hidden_size, num_heads, attn_scale)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, c):
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(x, c)  # (N, T, D) queries attend to the (N, 2, D) conditioning sequence
        x = x + self.mlp(self.norm2(x))
        return x


class InContextBlock(nn.Module):
    """Standard pre-LN ViT block; the conditioning is two extra tokens already in x, so c is unused."""

    cond_tokens, in_sequence = True, True

    def __init__(self, hidden_size, num_heads, mlp_ratio=MLP_RATIO, attn_scale=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attn_scale)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, c):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class Readout(nn.Linear):
    """The output linear layer, its input multiplied by a fixed output_mult: 1 under sp, 1 / width_mult
    under muP (TP5 Table 8, the multiplier form of Table 3's output weights; the bias is not scaled)."""

    def __init__(self, in_features, out_features, output_mult=1.0):
        super().__init__(in_features, out_features, bias=True)
        self.output_mult = output_mult

    def forward(self, x):
        return super().forward(x * self.output_mult)  # x * 1.0 is x bit for bit: sp is unchanged

    def extra_repr(self):
        return f"{super().extra_repr()}, output_mult={self.output_mult:g}"


class FinalLayer(nn.Module):
    """Adaptive final layer (adaLN, adaLN-Zero): LN modulated by c, then linear to p*p*C values a token."""

    def __init__(self, hidden_size, patch_size, out_channels, output_mult=1.0):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = Readout(hidden_size, patch_size * patch_size * out_channels, output_mult)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PlainFinalLayer(nn.Module):
    """Final layer of the in-context and cross-attention models: LN (affine), then linear; c is unused."""

    def __init__(self, hidden_size, patch_size, out_channels, output_mult=1.0):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linear = Readout(hidden_size, patch_size * patch_size * out_channels, output_mult)

    def forward(self, x, c):
        return self.linear(self.norm_final(x))


# Conditioning variant -> (block, final layer). The only place a variant name is looked up.
VARIANTS = {
    "in_context": (InContextBlock, PlainFinalLayer),
    "cross_attn": (CrossAttnBlock, PlainFinalLayer),
    "adaln": (AdaLNBlock, FinalLayer),
    "adaln_zero": (AdaLNZeroBlock, FinalLayer),
}
assert tuple(VARIANTS) == CONDS


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiT(nn.Module):
    """Diffusion model with a Transformer backbone: (N, C, H, W) latents -> (N, out_channels, H, W).

    parametrization "mup" with mup_base_width B: muP relative to the base model, which is this model at
    width B (same depth and heads); width_mult = hidden_size / B. At width B it is sp, bit for bit.
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=MLP_RATIO,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        cond="adaln_zero",
        grad_checkpoint=False,
        parametrization="sp",
        mup_base_width=None,
    ):
        super().__init__()
        errors = _arch_errors(cond, patch_size, input_size, hidden_size, num_heads)
        errors += _parametrization_errors(parametrization, mup_base_width, hidden_size, num_heads)
        if errors:
            raise ValueError("; ".join(errors))
        # The constructor's arguments: DiT(**self.arch) is this architecture (harness.model.mup rebuilds it at the
        # base width on the meta device to find which dimensions grow with width).
        self.arch = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, cond=cond, grad_checkpoint=grad_checkpoint,
            parametrization=parametrization, mup_base_width=mup_base_width,
        )
        self.parametrization = parametrization
        self.mup_base_width = mup_base_width
        # How much wider than its base the model is; 1 under sp, where nothing below changes.
        self.width_mult = hidden_size / mup_base_width if parametrization == "mup" else 1.0
        attn_scale = attention_scale(hidden_size // num_heads, self.width_mult)
        block_cls, final_cls = VARIANTS[cond]
        self.cond = cond
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        # learn_sigma: the second half of the channels is the variance interpolation v (improved DDPM)
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grad_checkpoint = grad_checkpoint
        self.cond_tokens = block_cls.cond_tokens
        self.in_sequence = block_cls.in_sequence

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding: a Parameter with requires_grad False, as in the public checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([block_cls(hidden_size, num_heads, mlp_ratio, attn_scale) for _ in range(depth)])
        # muP's readout multiplier 1 / width_mult (TP5 Table 3): with the readout trained at the base learning
        # rate, its output moves O(1) per step instead of O(width_mult).
        self.final_layer = final_cls(hidden_size, patch_size, self.out_channels, 1 / self.width_mult)
        self.initialize_weights()

    @property
    def null_label(self):
        """Returns the label that classifier-free guidance uses for "no class" (== num_classes)."""
        return self.y_embedder.null_label

    def initialize_weights(self):
        # Transformer layers: xavier-uniform weights, zero biases (the ViT recipe).
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        for module in self.modules():  # LayerNorm affine (in-context, cross-attention): identity
            if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding initialised like nn.Linear (not nn.Conv2d).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        # muP (TP5 Table 3): an input weight's fan_in (C*p*p) does not grow, so its entries keep their size;
        # xavier's 2 / (fan_in + fan_out) shrinks with fan_out = width. Rescale to the base model's xavier
        # bound, as mup.init.xavier_uniform_ does (a factor of exactly 1 at width_mult 1). The hidden
        # layers' xavier variance already goes as 1/fan_in, which is muP's (their fan_out / fan_in is fixed).
        fan_out, fan_in = w.shape[0], w[0].numel()
        w.mul_(math.sqrt((fan_in + fan_out) / (fan_in + fan_out / self.width_mult)))

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=EMBED_INIT_STD)
        # muP (TP5 Table 3): a hidden weight's variance ~ 1/fan_in. The public constant 0.02 is kept at the
        # base width and shrinks by 1/sqrt(width_mult) beyond it (width_mult is 1 under sp: unchanged).
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=EMBED_INIT_STD / math.sqrt(self.width_mult))

        # adaLN-Zero (section 3.2): zero the modulation, so every block starts as the identity. The plain
        # adaLN variant keeps the xavier init: the zero init is exactly what tells the two apart.
        if VARIANTS[self.cond][0] is AdaLNZeroBlock:
            for block in self.blocks:
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)

        # Every variant: zero output layer ("we initialize the final linear layer with zeros", section 4).
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """Returns (N, C, H, W) images from (N, T, p*p*C) patch tokens."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq (a permute, not einsum: fvcore counts einsum MACs)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def patchify(self, x):
        """Returns (N, T, p*p*C) patch tokens from (N, C, H, W) images; the inverse of unpatchify."""
        n, c, hp, wp = x.shape
        p = self.patch_size
        h, w = hp // p, wp // p
        x = x.reshape(n, c, h, p, w, p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # nchpwq -> nhwpqc
        return x.reshape(n, h * w, p * p * c)

    def forward(self, x, t, y, force_drop_ids=None):
        """Returns (N, out_channels, H, W) for latents x (N, C, H, W), timesteps t (N,), labels y (N,).

        force_drop_ids (N,), optional: 1 / True where the label is replaced by the null label, instead of
        the random label dropout of train mode (lets a trainer draw the dropout from its own generator).
        """
        x = self.x_embedder(x) + self.pos_embed                   # (N, T, D)
        t = self.t_embedder(t)                                    # (N, D)
        y = self.y_embedder(y, self.training, force_drop_ids)     # (N, D)
        c = torch.stack([t, y], dim=1) if self.cond_tokens else t + y  # (N, 2, D) or (N, D)
        if self.in_sequence:
            x = torch.cat([c, x], dim=1)             # (N, 2 + T, D)
        for block in self.blocks:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)  # recompute activations in backward
            else:
                x = block(x, c)                      # (N, T, D) or (N, 2 + T, D)
        if self.in_sequence:
            x = x[:, c.shape[1]:]                    # drop the conditioning tokens: (N, T, D)
        x = self.final_layer(x, c)                   # (N, T, p * p * out_channels)
        return self.unpatchify(x)                    # (N, out_channels, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=None):
        """Returns the guided output for the doubled batch x = [x_c; x_u], y = [labels; null labels].

        eps = eps_u + cfg_scale * (eps_c - eps_u) on the first cfg_channels channels (default: all
        in_channels epsilon channels) and is written to both halves, as in the public code; the remaining
        channels (cfg_channels=3 leaves latent channel 3 unguided, as the public code does) and the learned
        variance keep each half's own output.
        """
        if cfg_channels is None:
            cfg_channels = self.in_channels
        if not 1 <= cfg_channels <= self.in_channels:
            raise ValueError(f"cfg_channels={cfg_channels!r}; allowed: None or 1..{self.in_channels}")
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, :cfg_channels], model_out[:, cfg_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Returns a (grid_size * grid_size, embed_dim) float64 array of 2-D sine-cosine position embeddings."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """Returns a (M, embed_dim) array of sine-cosine embeddings of the M positions in pos."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                         Validation, build and registry                        #
#################################################################################

def _arch_errors(cond, patch, input_size, hidden_size, num_heads):
    """Returns the list of problems with a (cond, patch, input size, width, heads) choice; empty when fine."""
    errors = []
    if cond not in CONDS:
        errors.append(f"unknown cond {cond!r}; allowed: {', '.join(CONDS)}")
    if not isinstance(patch, int) or patch < 1:
        errors.append(f"patch size must be a positive int, got {patch!r}")
    elif input_size is not None and input_size % patch:  # None: input size unknown, reported elsewhere
        ok = [p for p in PATCH_SIZES if input_size % p == 0]
        errors.append(f"patch {patch} does not divide input_size {input_size}; patches that do: {ok}")
    if hidden_size is not None and num_heads is not None and hidden_size % num_heads:
        errors.append(f"num_heads {num_heads} does not divide hidden_size {hidden_size}")
    return errors


def _parametrization_errors(parametrization, mup_base_width, hidden_size, num_heads):
    """Returns the list of problems with a (parametrization, mup_base_width) choice for a model of this
    width and heads (None: unknown, not checked); empty when fine."""
    if parametrization not in PARAMETRIZATIONS:
        return [f"parametrization={parametrization!r}; allowed: {', '.join(PARAMETRIZATIONS)}"]
    if parametrization == "sp":
        if mup_base_width is not None:  # a base width that would silently do nothing is a mistake
            return [f"mup_base_width={mup_base_width!r} is only used with parametrization='mup'; "
                    f"allowed with 'sp': None"]
        return []
    allowed = "a positive int at most hidden_size"
    if hidden_size is not None and num_heads is not None and num_heads > 0:
        allowed = f"a multiple of num_heads {num_heads} from {num_heads} to hidden_size {hidden_size}"
    if isinstance(mup_base_width, bool) or not isinstance(mup_base_width, int) or mup_base_width < 1:
        return [f"parametrization='mup' needs mup_base_width, the width the learning rate is tuned at; "
                f"got mup_base_width={mup_base_width!r}; allowed: {allowed}"]
    errors = []
    if hidden_size is not None and mup_base_width > hidden_size:
        errors.append(f"mup_base_width={mup_base_width} > hidden_size {hidden_size}; allowed: {allowed}")
    # The base model keeps the heads (see attention_scale), so its head dim must be a whole number.
    if num_heads is not None and num_heads > 0 and mup_base_width % num_heads:
        errors.append(f"mup_base_width={mup_base_width} is not a multiple of num_heads {num_heads} (the base "
                      f"model keeps the heads); allowed: {allowed}")
    return errors


def _unknown_model(model):
    return (f"unknown model {model!r}; allowed: {', '.join(MODEL_SIZES)}, or an off-paper name "
            f"(e.g. 'demo-S') with depth, hidden_size and num_heads all given")


def validate_arch(model, patch, cond, input_size, hidden_size=None, num_heads=None, parametrization="sp",
                  mup_base_width=None):
    """Returns a list of error strings for one grid cell's architecture (empty when it can be built).

    A model name outside MODEL_SIZES is an off-paper size: accepted only with its width and heads given.
    """
    errors = []
    size = MODEL_SIZES.get(model)
    if size is None:
        if hidden_size is None or num_heads is None:
            errors.append(_unknown_model(model))
        size = {}
    if patch not in PATCH_SIZES:
        errors.append(f"unknown patch {patch!r}; allowed: {', '.join(map(str, PATCH_SIZES))}")
        patch = 1  # do not also complain that it fails to divide the input
    hidden_size = size.get("hidden_size") if hidden_size is None else hidden_size
    num_heads = size.get("num_heads") if num_heads is None else num_heads
    return (errors + _arch_errors(cond, patch, input_size, hidden_size, num_heads)
            + _parametrization_errors(parametrization, mup_base_width, hidden_size, num_heads))


def resolve_size(model, depth=None, hidden_size=None, num_heads=None):
    """Returns dict(depth, hidden_size, num_heads) of a named size with any given value overriding it."""
    given = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads)
    if model not in MODEL_SIZES and None in given.values():
        raise ValueError(_unknown_model(model))
    size = dict(MODEL_SIZES.get(model, {}))
    size.update({k: v for k, v in given.items() if v is not None})
    return size


def build(model="XL", patch=2, cond="adaln_zero", *, input_size=32, in_channels=4, num_classes=1000,
          learn_sigma=True, class_dropout_prob=0.1, depth=None, hidden_size=None, num_heads=None,
          grad_checkpoint=False, parametrization="sp", mup_base_width=None):
    """Returns the DiT of a grid cell (model, patch, cond); depth/hidden_size/num_heads override the size.

    parametrization: "sp" (the paper's) or "mup" with mup_base_width, the width the hyperparameters are
    tuned at (harness/mup.py gives the matching optimizer param groups).
    """
    errors = validate_arch(model, patch, cond, input_size, hidden_size, num_heads, parametrization,
                           mup_base_width)
    if errors:
        raise ValueError("; ".join(errors))
    size = resolve_size(model, depth, hidden_size, num_heads)
    return DiT(input_size=input_size, patch_size=patch, in_channels=in_channels, num_classes=num_classes,
               learn_sigma=learn_sigma, class_dropout_prob=class_dropout_prob, cond=cond,
               grad_checkpoint=grad_checkpoint, parametrization=parametrization, mup_base_width=mup_base_width,
               **size)


def _registry_entry(model, patch):
    def make(**kwargs):
        return build(model, patch, **kwargs)

    make.__name__ = make.__qualname__ = f"DiT_{model}_{patch}"
    make.__doc__ = f"Returns DiT-{model}/{patch}; takes build()'s keywords (input_size, cond, ...)."
    return make


# "DiT-XL/2" ... "DiT-S/8", as in the public code: DiT_models["DiT-XL/2"](input_size=32, cond="adaln")
DiT_models = {f"DiT-{m}/{p}": _registry_entry(m, p) for m in reversed(MODEL_SIZES) for p in PATCH_SIZES}


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def load_checkpoint(source, model=None, key="ema"):
    """Returns the state dict in source (a path or a loaded dict): a bare state dict, or ckpt[key] of a
    training checkpoint ("ema" or "model"). If model is given, loads it strictly into model."""
    if isinstance(source, (str, Path)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(source, dict):
        raise ValueError(f"checkpoint must be a dict, got {type(source).__name__}")
    if all(isinstance(v, torch.Tensor) for v in source.values()):
        state_dict = source  # bare state dict, e.g. the released DiT-XL-2-256x256.pt (EMA weights)
    elif isinstance(source.get(key), dict):
        state_dict = source[key]
    else:
        entries = [k for k, v in source.items() if isinstance(v, dict)]
        raise ValueError(f"checkpoint has no state dict under key {key!r}; entries that could be: {entries}")
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    if model is not None:
        _check_compatible(state_dict, model)
        model.load_state_dict(state_dict, strict=True)
    return state_dict


def _check_compatible(state_dict, model, show=5):
    """Raises a ValueError listing (the first few) missing, unexpected and wrongly shaped entries."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    mismatched = [f"{k}: checkpoint {got[k]} vs model {expected[k]}"
                  for k in sorted(expected.keys() & got.keys()) if got[k] != expected[k]]
    problems = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" (+{len(items) - show} more)" if len(items) > show else ""
            problems.append(f"{len(items)} {name}: {', '.join(items[:show])}{more}")
    if problems:
        raise ValueError("checkpoint does not match the model architecture: " + "; ".join(problems))
