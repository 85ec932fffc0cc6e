"""Classifier-free guidance (Ho & Salimans 2022) as DiT samples with it: one doubled batch per step."""

import math

import torch


def guided_model_fn(model, cfg_scale: float, cfg_channels=None, null_label=None):
    """Returns model_fn(x, t, y) -> (N, out_channels, H, W): the model's output guided with scale cfg_scale.

    Each call builds the doubled batch [x; x], [t; t], [y; null] and asks model.forward_with_cfg for
    eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond) on the first `cfg_channels` channels (all eps
    channels when None; the public DiT code guides 3 of 4); the other channels (learned variance) come from
    the conditional half. Returns the first (conditional) half. At cfg_scale == 1 guidance is the identity,
    so the model is called once on the undoubled batch (half the compute).
    `null_label` is the model's extra "no class" label (num_classes in DiT); it has no default on purpose.
    """
    if null_label is None:
        raise ValueError("guided_model_fn needs null_label (the model's unconditional class index)")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale}")
    if cfg_channels is not None and cfg_channels < 1:
        raise ValueError(f"cfg_channels must be None (all eps channels) or >= 1, got {cfg_channels}")

    if cfg_scale == 1.0:

        def unguided(x, t, y):
            return model(x, t, y)

        return unguided

    def guided(x, t, y):
        null = torch.full_like(y, null_label)
        out = model.forward_with_cfg(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), cfg_scale, cfg_channels=cfg_channels
        )
        return out[: x.shape[0]]

    return guided
