"""Respacing: run a diffusion trained on T steps on a subset S of its timesteps (iDDPM Sec. 4).

The respaced process keeps alpha-bar at the kept steps and rebuilds its betas from it (iDDPM Eq. 19), and the
network, which only knows the original T steps, is always called with the original timestep index.
"""

import torch

from harness.diffusion.gaussian import GaussianDiffusion

RESPACING_FORMS = '"" (all steps), "N" (N evenly spaced steps), "N1,N2,..." (N_i steps in section i), "ddimN"'


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Returns the sorted original timesteps kept when respacing num_timesteps steps as `section_counts`.

    `section_counts` is "ddimN" (the integer stride s that gives exactly N steps: 0, s, 2s, ...), or "N",
    "N1,N2,..." or a list of ints: the T steps are cut into equal sections and section i keeps N_i steps
    evenly spaced over it, first and last step included, fractional strides rounded (as the public code does).
    E.g. space_timesteps(1000, "250") keeps round(i * 999 / 249) for i = 0..249: 0, 4, ..., 164, 169, ...,
    995, 999, strides of 4 except three of 5 (after 164, 497 and 830).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = section_counts[len("ddim") :]
            if not desired.isdigit():
                raise ValueError(
                    f"bad timestep respacing {section_counts!r}; allowed forms: {RESPACING_FORMS}"
                )
            desired_count = int(desired)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"no integer stride gives exactly {desired_count} of {num_timesteps} steps "
                f"for {section_counts!r}"
            )
        parts = section_counts.split(",")
        if not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"bad timestep respacing {section_counts!r}; allowed forms: {RESPACING_FORMS}")
        section_counts = [int(p) for p in parts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= section_count <= size:
            raise ValueError(
                f"cannot take {section_count} steps from a section of {size} steps (need 1..{size})"
            )
        frac_stride = 1 if section_count == 1 else (size - 1) / (section_count - 1)
        # important: the stride is accumulated in floating point exactly as the public code does, so the kept
        # steps (and hence sampling results) match it.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return sorted(set(all_steps))


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion on a subset of a base process's steps; the model sees the original timesteps."""

    def __init__(self, use_timesteps, base_betas: torch.Tensor, *, learn_sigma: bool = True):
        base_betas = torch.as_tensor(base_betas, dtype=torch.float64)
        use = sorted(set(int(s) for s in use_timesteps))
        if not use or use[0] < 0 or use[-1] >= len(base_betas):
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{len(base_betas) - 1}")
        base_alphas_cumprod = torch.cumprod(1.0 - base_betas, dim=0)
        alphas_cumprod = base_alphas_cumprod[use]
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Eq. 19: beta_{S_t} = 1 - alpha-bar_{S_t} / alpha-bar_{S_{t-1}}, so the respaced process has exactly
        # the original alpha-bar at every kept step; its posterior variance (Eq. 20) then follows from Eq. 10.
        super().__init__(1.0 - alphas_cumprod / alphas_cumprod_prev, learn_sigma=learn_sigma)
        self.original_num_steps = len(base_betas)
        self.timestep_map = torch.tensor(use, dtype=torch.long)  # respaced index -> original timestep

    def _call_model(self, model_fn, x, t, model_kwargs):
        """Returns model_fn's output at x, called with the ORIGINAL timestep of respaced index t."""
        return model_fn(x, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
