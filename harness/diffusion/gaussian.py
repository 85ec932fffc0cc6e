"""Gaussian diffusion as DiT trains and samples it: epsilon prediction with a learned-range variance.

Written to be checked against Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"
(arXiv 2102.09672): "Eq. N" below means equation N of that paper. The DDIM sampler follows Song, Meng & Ermon
2021 (arXiv 2010.02502), cited as "DDIM Eq. N". The structure follows openai/guided-diffusion as used by
facebookresearch/DiT, trimmed to what DiT uses.

Schedules are computed and stored in float64 and cast to the input's dtype per timestep (`_extract`).
"""

import math

import torch

from harness.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

DEFAULT_DIFFUSION_STEPS = 1000
# Ho et al. 2020's linear schedule, defined for 1000 steps (Sec. 4 there).
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
# iDDPM Eq. 17: offset s of the cosine schedule, and the cap on beta near t = T.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999
NOISE_SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """Returns the betas of a named noise schedule: float64 tensor of shape (num_timesteps,)."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if name == "linear":
        # Scaled as in the public code, so any step count gives about the same alpha-bar at t = T;
        # at 1000 steps this is exactly 1e-4 .. 0.02.
        scale = DEFAULT_DIFFUSION_STEPS / num_timesteps
        return torch.linspace(
            scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_timesteps, dtype=torch.float64
        )
    if name == "cosine":
        # Eq. 17: alpha-bar_t = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); betas from
        # beta_t = 1 - alpha-bar_t / alpha-bar_{t-1}, capped to avoid the singularity at t = T.
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=COSINE_MAX_BETA)
    raise ValueError(f"unknown noise_schedule {name!r}; allowed: {NOISE_SCHEDULES}")


def randn_per_sample(shape, generators=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Returns standard normal noise of `shape`; sample i comes from generators[i] when generators are given.

    Each sample's noise is drawn on the CPU from its own generator and then moved to `device`, so a sample's
    noise does not depend on the batch it is in or the device it runs on (evaluation shards rely on this).
    Without generators, draws from the global torch RNG on `device`.
    """
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {shape[0]}")
    for g in generators:
        if g.device.type != "cpu":
            raise ValueError(f"generators must be CPU torch.Generator objects, got one on {g.device}")
    noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in generators])
    return noise.to(device)


def _extract(arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Returns arr[t] cast to x's dtype and device, shaped (N, 1, ..., 1) to broadcast against x."""
    out = arr.to(t.device)[t].to(device=x.device, dtype=x.dtype)
    return out.reshape(-1, *([1] * (x.ndim - 1)))


class GaussianDiffusion:
    """A discrete Gaussian diffusion over len(betas) steps; the net predicts eps (and v if learn_sigma)."""

    def __init__(self, betas: torch.Tensor, *, learn_sigma: bool = True):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be 1-D with at least 2 steps, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(
                f"betas must lie in (0, 1], got min {betas.min().item()}, max {betas.max().item()}"
            )
        self.betas = betas
        self.learn_sigma = learn_sigma
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)  # alpha-bar_t, Eq. 7
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

        # q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I), Eq. 8-9.
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - self.alphas_cumprod)
        # Eq. 9 solved for x_0: x_0 = sqrt(1 / alpha-bar_t) x_t - sqrt(1 / alpha-bar_t - 1) eps.
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0) = N(mu-tilde_t, beta-tilde_t I), Eq. 10-12.
        # Eq. 10: beta-tilde_t = beta_t (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # important: beta-tilde_0 = 0, so its log is -inf; like the public code we use beta-tilde_1 at t = 0.
        # (At t = 0 the variance only enters the decoder L_0, never a sampling step's noise.)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        # Eq. 11: mu-tilde_t = coef1 * x_0 + coef2 * x_t.
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )

    def to(self, device: "torch.device | str") -> "GaussianDiffusion":
        """Moves the schedule tables to `device` once (returns self), so no step copies them from the host."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def sample_t(self, n: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """Returns n training timesteps drawn uniformly from 0..num_timesteps-1 with `generator` (int64)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def stratified_t(self, k: int, device=None) -> torch.Tensor:
        """Returns k timesteps (int64) at the midpoints of k equal strata of the training distribution (uniform over
        0..num_timesteps-1): floor((j + 1/2) T / k), j = 0..k-1. A loss averaged over them estimates the training
        loss's expectation over t with no sampling noise in t (SD3 reports its validation loss at such times)."""
        if k < 1:
            raise ValueError(f"k must be a positive number of times, got {k}")
        j = torch.arange(k, dtype=torch.float64)
        return torch.floor((j + 0.5) * self.num_timesteps / k).to(torch.int64).to(device)

    # ----- the forward process q -----

    def q_mean_variance(self, x_start, t):
        """Returns (mean, variance, log_variance) of q(x_t | x_0), Eq. 8; variance and log broadcast to x."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Returns x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps, a draw of q(x_t | x_0), Eq. 9."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Returns (mean, variance, log_variance_clipped) of q(x_{t-1} | x_t, x_0), Eq. 10-12."""
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = _extract(self.posterior_variance, t, x_t)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """Returns the x_0 implied by x_t and eps (Eq. 9 solved for x_0)."""
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """Returns the eps implied by x_t and x_0 (Eq. 9 solved for eps)."""
        numerator = _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        return numerator / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # ----- the reverse process p -----

    def _call_model(self, model_fn, x, t, model_kwargs):
        """Returns model_fn's output at x and step t (SpacedDiffusion maps t to the original timestep)."""
        return model_fn(x, t, **(model_kwargs or {}))

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised=False):
        """Returns dict(mean, variance, log_variance, pred_xstart, eps) of p(x_{t-1} | x_t) from output."""
        C = x.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"learn_sigma needs {2 * C} output channels (eps and v), "
                    f"got shape {tuple(model_output.shape)}"
                )
            eps, v = model_output.split(C, dim=1)
            # Eq. 15: Sigma = exp(v' log beta_t + (1 - v') log beta-tilde_t); the network's v lies nominally
            # in [-1, 1], mapped to the interpolation weight v' = (v + 1) / 2 as in the public code.
            min_log = _extract(self.posterior_log_variance_clipped, t, x)
            max_log = _extract(torch.log(self.betas), t, x)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            if model_output.shape[1] != C:
                raise ValueError(f"need {C} output channels (eps), got shape {tuple(model_output.shape)}")
            eps = model_output
            # Fixed "large" variance sigma^2 = beta_t (Ho et al. 2020), with beta-tilde_1 at t = 0 so that
            # L_0 keeps a sensible decoder variance (as the public code does).
            fixed = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            log_variance = _extract(torch.log(fixed), t, x).expand_as(x)
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        # With x_0 replaced by its prediction, mu-tilde (Eq. 11) is the mean of Eq. 13.
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(self, model_fn, x, t, *, clip_denoised=False, model_kwargs=None):
        """Returns dict(mean, variance, log_variance, pred_xstart, eps) of p(x_{t-1} | x_t), Eq. 2."""
        model_output = self._call_model(model_fn, x, t, model_kwargs)
        return self._p_mean_variance_from_output(model_output, x, t, clip_denoised)

    # ----- training -----

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        """Returns the bound term L_{t} for each sample, in bits per dim: shape (N,).

        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 (Eq. 5) and L_0 = -log p(x_0 | x_1)
        (Eq. 4) at t = 0, each averaged over dimensions and divided by ln 2.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model_fn, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Returns the per-sample hybrid loss terms {"loss", "mse", "vb"}, each of shape (N,).

        "mse" is L_simple (Eq. 14) averaged over dimensions; "vb" is the bound term L_t in bits per dim,
        computed with the predicted mean detached so that it trains only the variance (Sec. 3.1).
        "loss" = mse + vb: with t drawn uniformly from T = 1000 steps, vb is an unbiased estimate of
        L_vlb / T, which is Eq. 16's lambda = 0.001 (the public DiT code adds vb unscaled, as here).
        vb is zero when learn_sigma is False.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._call_model(model_fn, x_t, t, model_kwargs)
        C = x_start.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"learn_sigma needs {2 * C} output channels (eps and v), "
                    f"got shape {tuple(model_output.shape)}"
                )
            eps, v = model_output.split(C, dim=1)
            # Stop-gradient on the mean (Sec. 3.1): the bound sees eps as a constant, so only v learns from
            # it.
            frozen_output = torch.cat([eps.detach(), v], dim=1)
            vb = self._vb_terms_bpd(frozen_output, x_start, x_t, t)
        else:
            eps = model_output
            vb = torch.zeros(x_start.shape[0], device=x_start.device, dtype=x_start.dtype)
        mse = mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ----- sampling -----

    def _initial_noise(self, shape, noise, generators, device):
        """Returns x_T: the given noise, or a fresh draw per sample (see randn_per_sample)."""
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            return noise.to(device) if device is not None else noise
        return randn_per_sample(shape, generators, device=device)

    def _timesteps(self, progress):
        """Returns the respaced indices T-1, ..., 0, wrapped in a tqdm bar when progress is True."""
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm  # only needed when asked for

            return tqdm(indices)
        return indices

    def p_sample(self, model_fn, x, t, *, noise=None, clip_denoised=False, model_kwargs=None):
        """Returns one ancestral step x_{t-1} ~ p(x_{t-1} | x_t) = N(mean, Sigma), Eq. 2 (no noise at t=0)."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        if noise is None:
            noise = torch.randn_like(x)
        nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise

    @torch.no_grad()
    def p_sample_loop(
        self,
        model_fn,
        shape,
        *,
        noise=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generators=None,
        clip_denoised=False,
    ) -> torch.Tensor:
        """Returns samples x_0 of `shape` from the ancestral DDPM sampler over all num_timesteps steps.

        With `generators` (one CPU torch.Generator per sample), the initial noise (when `noise` is None) and
        every step's noise for sample i come from generators[i], so a sample does not depend on its batch.
        """
        x = self._initial_noise(shape, noise, generators, device)
        for i in self._timesteps(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            step_noise = randn_per_sample(x.shape, generators, device=x.device, dtype=x.dtype)
            x = self.p_sample(
                model_fn, x, t, noise=step_noise, clip_denoised=clip_denoised, model_kwargs=model_kwargs
            )
        return x

    def ddim_sample(self, model_fn, x, t, *, noise=None, eta=0.0, clip_denoised=False, model_kwargs=None):
        """Returns one DDIM step x_{t-1} (DDIM Eq. 12, sigma from DDIM Eq. 16); deterministic when eta = 0."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        # Re-derive eps from x_0 so that clipping x_0 (if asked) stays consistent with the step.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x)
        sigma = (
            eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt() * (1 - alpha_bar / alpha_bar_prev).sqrt()
        )
        mean_pred = out["pred_xstart"] * alpha_bar_prev.sqrt() + (1 - alpha_bar_prev - sigma**2).sqrt() * eps
        if eta == 0:
            return mean_pred
        if noise is None:
            noise = torch.randn_like(x)
        nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return mean_pred + nonzero_mask * sigma * noise

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model_fn,
        shape,
        *,
        noise=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generators=None,
        eta=0.0,
        clip_denoised=False,
    ) -> torch.Tensor:
        """Returns samples x_0 of `shape` from the DDIM sampler over all num_timesteps steps.

        eta = 0 is deterministic given the initial noise. `generators` work as in p_sample_loop; with eta = 0
        only the initial noise is drawn.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        x = self._initial_noise(shape, noise, generators, device)
        for i in self._timesteps(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            step_noise = None
            if eta > 0:
                step_noise = randn_per_sample(x.shape, generators, device=x.device, dtype=x.dtype)
            x = self.ddim_sample(
                model_fn,
                x,
                t,
                noise=step_noise,
                eta=eta,
                clip_denoised=clip_denoised,
                model_kwargs=model_kwargs,
            )
        return x
