"""The validation loss: an estimator a study can quote, on images the model never trained on.

n held-out images (`train.val_images`, a fixed seeded subset of the data kind's held-out split), each at K fixed times
(`train.val_times`) at the midpoints of K equal strata of the objective's time distribution, as SD3 reports its
validation loss, with fixed noise per (image, time). The loss of an image is its mean over the K times; the record
holds the mean over images and its standard error (sample standard deviation over images / sqrt(n)), for the raw
and the EMA weights. The times are fixed, so the estimate carries no noise from drawing t, and every record of
every cell of a data set is measured on the same images, times and noise: differences between cells and steps are
the models'.

Under DDPM the scaling target is the MSE term (L_simple): the VB term is recorded beside it (`*_vb`), but it holds
the t = 0 decoder likelihood, which assumes 8-bit pixels and is a model-independent offset for latents. A flow
objective's loss is its velocity MSE.

A data set without a held-out split (latent shards without `val/`, an image folder without `val/`) is still
measured, on a fixed batch of training images, and recorded under other names (`train_batch_loss`, ...): it is
never called a validation loss, and the laws refuse it unless asked to (docs/scaling.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from harness.core.config import DEFAULT_VAL_IMAGES
from harness.data import datasets

VAL_SEED = 20_231_212  # the validation set draws from its own stream, identical for every cell of a data set
VAL_CHUNK = 256  # images per forward pass


@dataclass
class ValidationSet:
    """Fixed model inputs, labels, times and noise: x (n, C, H, W), y (n,), t (K,), noise (n, K, C, H, W)."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    split: str  # the data split the images come from
    heldout: bool  # never trained on (False: a fixed training batch)
    target: str  # the loss term the scaling laws fit: "mse"

    @property
    def prefix(self) -> str:
        """The name of what is measured: `val` on held-out images, `train_batch` on training images."""
        return "val" if self.heldout else "train_batch"

    def describe(self) -> dict:
        """Returns what a record says about how it was measured."""
        return {"split": self.split, "heldout": self.heldout, "num_images": int(self.x.shape[0]),
                "times": int(self.t.shape[0]), "target": self.target, "estimator": "stratified-times",
                "seed": VAL_SEED}


def validation_set(cfg: Any, objective, codec=None, device: torch.device | str = "cpu",
                   train_dataset=None, training_images: bool = False, num_images: int | None = None) -> ValidationSet:
    """Returns the cell's validation set: train.val_images held-out images (default: the split, at most
    DEFAULT_VAL_IMAGES; a fixed training batch when the data set has no held-out split: `train_dataset`, built here
    when not given), train.val_times times, fixed noise. `codec` encodes pixels (the kinds the paper encodes every
    step); None: inputs are final. `training_images`: the same estimator on a fixed batch of training images (what
    the held-out loss is compared with to see how much of a loss is memorisation); `num_images` overrides the
    count."""
    found = None if training_images else datasets.heldout_dataset(cfg.data)
    if found is not None:
        dataset, split, heldout = *found, True
    else:
        dataset = train_dataset if train_dataset is not None else datasets.build_dataset(cfg.data, "train")
        split, heldout = "train", False
    g = torch.Generator().manual_seed(VAL_SEED)
    n = min(int(num_images or getattr(cfg.train, "val_images", None) or DEFAULT_VAL_IMAGES), len(dataset))
    # A seeded subset; of a stream that never repeats, its first n images (seen once, early in training).
    idx = torch.randperm(len(dataset), generator=g)[:n] if datasets.unique_images(dataset) else torch.arange(n)
    x, y = dataset.get_batch(idx)
    x = dataset.fixed(x, g)
    if codec is not None:
        with torch.no_grad():
            x = codec.encode(x.to(device), generator=g).cpu()
    t = objective.stratified_t(int(cfg.train.val_times))
    noise = torch.randn((n, len(t), *x.shape[1:]), generator=g)
    return ValidationSet(x=x, y=y, t=t, noise=noise, split=split, heldout=heldout, target="mse")


@torch.no_grad()
def _per_image(model, objective, vs: ValidationSet, autocast, chunk: int) -> dict[str, torch.Tensor]:
    """Returns {term: (n,) float64}: each image's loss terms averaged over the K times."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    n, k = vs.x.shape[0], vs.t.shape[0]
    for j in range(k):
        for lo in range(0, n, chunk):
            sl = slice(lo, lo + chunk)
            x = vs.x[sl].to(dev)
            t = vs.t[j].expand(x.shape[0]).to(dev)
            with autocast:
                terms = objective.training_losses(model, x, t, {"y": vs.y[sl].to(dev)}, noise=vs.noise[sl, j].to(dev))
            for name in ("mse", "vb"):
                if name in terms:
                    part = terms[name].detach().double().cpu()
                    sums.setdefault(name, torch.zeros(n, dtype=torch.float64))[sl] += part
    model.train(was_training)
    return {name: s / k for name, s in sums.items()}


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Returns (mean, standard error of the mean) of per-image values (SE NaN for a single image)."""
    n = values.numel()
    mean = float(values.mean())
    se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, se


def validation_record(model, ema, objective, vs: ValidationSet, autocast, chunk: int = VAL_CHUNK) -> dict:
    """Returns the loss of the raw and the EMA weights on the validation set: {"<p>_loss", "<p>_loss_se",
    "<p>_loss_ema", "<p>_loss_ema_se", and under DDPM "<p>_vb", "<p>_vb_ema" (the VB term's mean, beside the MSE
    target)}, p = `val` (held-out) or `train_batch`, plus "validation": how it was measured (`describe`)."""
    rec: dict = {}
    for suffix, net in (("", model), ("_ema", ema)):
        terms = _per_image(net, objective, vs, autocast, chunk)
        rec[f"{vs.prefix}_loss{suffix}"], rec[f"{vs.prefix}_loss{suffix}_se"] = _mean_se(terms[vs.target])
        if "vb" in terms and bool(terms["vb"].abs().sum() > 0):
            rec[f"{vs.prefix}_vb{suffix}"] = float(terms["vb"].mean())
    rec["validation"] = vs.describe()
    return rec
