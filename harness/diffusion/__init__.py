"""The paper's Gaussian diffusion (1000 linear-beta steps, eps prediction, learned variance, respacing) and the
rectified-flow objective beside it (linear interpolant, velocity prediction; SiT, SD3)."""

from harness.diffusion.flow import (
    FLOW_SAMPLERS,
    MODEL_TIME_SCALE,
    TIME_SAMPLINGS,
    RectifiedFlow,
    create_flow,
    sampler_nfe,
)
from harness.diffusion.gaussian import (
    DEFAULT_DIFFUSION_STEPS,
    NOISE_SCHEDULES,
    GaussianDiffusion,
    get_named_beta_schedule,
    randn_per_sample,
)
from harness.diffusion.guidance import guided_model_fn
from harness.diffusion.respace import SpacedDiffusion, space_timesteps

__all__ = [
    "DEFAULT_DIFFUSION_STEPS",
    "FLOW_SAMPLERS",
    "MODEL_TIME_SCALE",
    "NOISE_SCHEDULES",
    "TIME_SAMPLINGS",
    "GaussianDiffusion",
    "RectifiedFlow",
    "SpacedDiffusion",
    "create_diffusion",
    "create_flow",
    "get_named_beta_schedule",
    "guided_model_fn",
    "randn_per_sample",
    "sampler_nfe",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing="",
    *,
    diffusion_steps: int = DEFAULT_DIFFUSION_STEPS,
    learn_sigma: bool = True,
    noise_schedule: str = "linear",
) -> SpacedDiffusion:
    """Returns the diffusion DiT trains ("" = all steps) or samples with ("250", "ddim50", ...).

    An int respacing (a YAML `250` read unquoted) is taken as its string form.
    """
    if isinstance(timestep_respacing, int) and not isinstance(timestep_respacing, bool):
        timestep_respacing = str(timestep_respacing)
    if not isinstance(timestep_respacing, str):
        raise ValueError(
            f"timestep_respacing must be a string such as '250' or 'ddim50', got {timestep_respacing!r}"
        )
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    use_timesteps = space_timesteps(diffusion_steps, timestep_respacing or [diffusion_steps])
    return SpacedDiffusion(use_timesteps, betas, learn_sigma=learn_sigma)
