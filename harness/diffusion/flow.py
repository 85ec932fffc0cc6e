"""Rectified flow: the DiT backbone trained on a linear interpolant with velocity prediction (SiT, SD3).

Conventions (SD3's: Esser et al. 2024, arXiv 2403.03206, Sec. 2-3): t in [0, 1], t = 0 is the data, t = 1
the noise. With data x_0 and noise eps ~ N(0, I),

    x_t = (1 - t) x_0 + t eps,        v = d x_t / dt = eps - x_0,

and the network v_theta(x_t, t) regresses v: the loss of a sample is the mean over its elements of
(v_theta - v)^2, SiT's velocity loss (Ma et al. 2024, arXiv 2401.08740, Sec. 2) with the linear interpolant.
Sampling integrates dx/dt = v_theta from t = 1 (noise) down to t = 0 (data).

Mapping to SiT's code (willisma/SiT, `transport/`: Linear path, velocity prediction). Its code runs time the
other way (the SiT paper writes time as here): s = 0 noise, s = 1 data, x_s = s x_data + (1 - s) eps, target
u = x_data - eps. So s = 1 - t, x_s is our x_t at t = 1 - s, and u(x, s) = -v(x, 1 - s): a model trained
here outputs minus what a SiT model outputs at the mirrored time, and for the same (x_0, eps) and t = 1 - s
the two per-sample losses are equal. SiT's sampling grids, run from s = 0 to 1, are ours from t = 1 to 0.

The network is the paper's DiT with learn_sigma=False (it outputs the latent channels only: the velocity).
It is called as model_fn(x, t_model, **model_kwargs) with t_model = MODEL_TIME_SCALE * t, like the DDPM
path, so classifier-free guidance (`guided_model_fn`) guides the velocity unchanged.
"""

import math

import torch

from harness.core.config import FLOW_SAMPLERS, TIME_SAMPLINGS  # the allowed names: one home, with the config
from harness.diffusion.gaussian import randn_per_sample
from harness.diffusion.losses import mean_flat

# How t in [0, 1] is fed to the DiT's timestep embedder: t_model = 1000 t, as SD3's public implementation
# does. The embedder is the DDPM path's (DiT's 256 sinusoidal features, max period 10000), made for the
# integer steps 0..999. Fed t in [0, 1] directly (SiT's choice), every argument t * freq_k is at most freq_k, and
# 3/4 of the 128 frequencies are below 0.1, so those features hardly move with t; at 1000 t the embedder
# sees the range it sees in the DDPM runs, so the two objectives train the same backbone on the same inputs.
MODEL_TIME_SCALE = 1000.0

# SD3's logit-normal time density (Sec. 3.1): logit(t) ~ N(loc, scale^2); (0, 1) ranked best there (Sec. 5.1).
DEFAULT_LOGIT_NORMAL_LOC = 0.0
DEFAULT_LOGIT_NORMAL_SCALE = 1.0

# SiT's SDE sampler with the defaults of its sampling script (Euler-Maruyama, `--diffusion-form sigma`,
# `--diffusion-norm 1`, `--last-step Mean`, `--last-step-size 0.04`): diffusion coefficient w = norm * sigma,
# sigma the noise coefficient of the interpolant (t here, 1 - s in SiT's code), the form behind SiT's best
# reported FID; the last 0.04 of time is one noise-free Euler step of the SDE drift. Not reproduced: SiT's
# other diffusion forms, its stochastic Heun, and its "Tweedie" and "Euler" last steps.
SDE_DIFFUSION_NORM = 1.0
SDE_LAST_STEP_SIZE = 0.04


def _check_num_steps(sampler: str, num_steps) -> None:
    """Raises ValueError unless sampler is one of FLOW_SAMPLERS and num_steps an int it can run."""
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"unknown flow sampler {sampler!r}; allowed: {FLOW_SAMPLERS}")
    minimum = 2 if sampler == "sde" else 1  # the SDE needs at least one Euler-Maruyama step before its last
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < minimum:
        raise ValueError(f"num_steps for the {sampler!r} sampler must be an int >= {minimum}, got {num_steps!r}")


def sampler_nfe(sampler: str, num_steps: int) -> int:
    """Returns the number of model evaluations (network forward passes of the batch) of one sample_loop.

    euler: num_steps. heun: 2 num_steps - 1 (every interval a Heun step of 2 evaluations except the last, an
    Euler step, as in EDM's Algorithm 1). sde: num_steps (num_steps - 1 Euler-Maruyama steps and the final
    noise-free step, as SiT counts them). Classifier-free guidance doubles the batch, not the count.
    """
    _check_num_steps(sampler, num_steps)
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def _is_finite_number(value) -> bool:
    """Returns True for a finite int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _time_tensor(value: float, x: torch.Tensor) -> torch.Tensor:
    """Returns (N,) filled with value on x's device, float32 (float64 for float64 x): t never in bf16/fp16."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), value, device=x.device, dtype=dtype)


def _broadcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Returns the (N,) tensor t cast to x's dtype and device, shaped (N, 1, ..., 1) to broadcast against x."""
    return t.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class RectifiedFlow:
    """The rectified-flow objective and its samplers; t = 0 data, t = 1 noise (see the module docstring)."""

    def __init__(
        self,
        *,
        time_sampling: str = "uniform",
        logit_normal_loc: float = DEFAULT_LOGIT_NORMAL_LOC,
        logit_normal_scale: float = DEFAULT_LOGIT_NORMAL_SCALE,
    ):
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; allowed: {TIME_SAMPLINGS}")
        if not _is_finite_number(logit_normal_loc):
            raise ValueError(f"logit_normal_loc must be a finite number, got {logit_normal_loc!r}")
        if not (_is_finite_number(logit_normal_scale) and logit_normal_scale > 0):
            raise ValueError(f"logit_normal_scale must be a finite number > 0, got {logit_normal_scale!r}")
        self.time_sampling = time_sampling
        self.logit_normal_loc = float(logit_normal_loc)
        self.logit_normal_scale = float(logit_normal_scale)

    def to(self, device: "torch.device | str") -> "RectifiedFlow":
        """Returns self: a flow has no tables to move (the same interface as GaussianDiffusion.to)."""
        return self

    # ----- the interpolant -----

    @staticmethod
    def interpolate(x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Returns x_t = (1 - t) x_0 + t eps, shape of x_start; t is (N,) in [0, 1]."""
        tb = _broadcast(t, x_start)
        return (1 - tb) * x_start + tb * noise

    @staticmethod
    def velocity_target(x_start: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Returns the regression target v = d x_t / dt = eps - x_0, shape of x_start (independent of t)."""
        return noise - x_start

    @staticmethod
    def model_time(t: torch.Tensor) -> torch.Tensor:
        """Returns the timestep the network sees for t in [0, 1]: MODEL_TIME_SCALE * t, in [0, 1000]."""
        return t * MODEL_TIME_SCALE

    # ----- training -----

    def sample_t(self, n: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """Returns n training times in [0, 1], float32 of shape (n,) on `device`, from the configured density.

        Drawn only from `generator` (on its own device; None: the global torch RNG), so a trainer can draw a
        whole global batch's times from one per-step generator and slice its shard out of them.
        uniform: U[0, 1) (SiT). logit_normal: sigmoid(loc + scale * N(0, 1)) (SD3 Sec. 3.1).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        draw_device = generator.device if generator is not None else device
        if self.time_sampling == "uniform":
            t = torch.rand(n, generator=generator, device=draw_device, dtype=torch.float32)
        else:
            u = torch.randn(n, generator=generator, device=draw_device, dtype=torch.float32)
            t = torch.sigmoid(self.logit_normal_loc + self.logit_normal_scale * u)
        return t.to(device) if device is not None else t

    def stratified_t(self, k: int, device=None) -> torch.Tensor:
        """Returns k times (float32) at the midpoints of k equal-probability strata of the training density: its
        quantiles at (j + 1/2) / k, j = 0..k-1 (uniform: the midpoints themselves; logit-normal: sigmoid of the
        normal quantiles). A loss averaged over them estimates the training loss's expectation over t with no
        sampling noise in t (SD3 reports its validation loss at such times)."""
        if k < 1:
            raise ValueError(f"k must be a positive number of times, got {k}")
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        if self.time_sampling == "logit_normal":
            q = torch.sigmoid(self.logit_normal_loc + self.logit_normal_scale * torch.special.ndtri(q))
        return q.to(torch.float32).to(device)

    def training_losses(self, model_fn, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Returns the per-sample flow-matching loss terms {"loss", "mse"}, each of shape (N,).

        mse = mean over all elements of a sample of (v_theta(x_t, t) - (eps - x_0))^2, SiT's velocity loss;
        loss = mse (no variance term: the model has no learned sigma). `t` is a float (N,) tensor in [0, 1]
        (not checked against the range, which would cost a device sync per step); `noise` defaults to a
        fresh N(0, I) draw like x_start.
        """
        if not torch.is_tensor(t) or not t.is_floating_point() or t.shape != (x_start.shape[0],):
            raise ValueError(
                f"t must be a float tensor of shape ({x_start.shape[0]},) with values in [0, 1], got "
                + (f"{t.dtype} of shape {tuple(t.shape)}" if torch.is_tensor(t) else repr(t))
            )
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        x_t = self.interpolate(x_start, t, noise)
        velocity = model_fn(x_t, self.model_time(t), **(model_kwargs or {}))
        if velocity.shape != x_start.shape:
            raise ValueError(
                f"the flow model must output the velocity only, shape {tuple(x_start.shape)} (a DiT with "
                f"learn_sigma=False), got {tuple(velocity.shape)}"
            )
        mse = mean_flat((velocity - self.velocity_target(x_start, noise)) ** 2)
        return {"loss": mse, "mse": mse}

    # ----- sampling -----

    def _velocity(self, model_fn, x, t: float, model_kwargs):
        """Returns v_theta(x, t) for a scalar time t in [0, 1], shape of x."""
        velocity = model_fn(x, self.model_time(_time_tensor(t, x)), **(model_kwargs or {}))
        if velocity.shape != x.shape:
            raise ValueError(f"the flow model must output shape {tuple(x.shape)}, got {tuple(velocity.shape)}")
        return velocity

    def euler_step(self, model_fn, x, t_cur: float, t_next: float, *, model_kwargs=None) -> torch.Tensor:
        """Returns x at t_next from one Euler step of dx/dt = v_theta: x + (t_next - t_cur) v(x, t_cur)."""
        return x + (t_next - t_cur) * self._velocity(model_fn, x, t_cur, model_kwargs)

    def heun_step(self, model_fn, x, t_cur: float, t_next: float, *, model_kwargs=None) -> torch.Tensor:
        """Returns x at t_next from one Heun step (explicit trapezoid, EDM Algorithm 1): 2 evaluations.

        x' = x + h v(x, t_cur), then x + h (v(x, t_cur) + v(x', t_next)) / 2 with h = t_next - t_cur.
        """
        h = t_next - t_cur
        d_cur = self._velocity(model_fn, x, t_cur, model_kwargs)
        x_euler = x + h * d_cur
        d_next = self._velocity(model_fn, x_euler, t_next, model_kwargs)
        return x + h * 0.5 * (d_cur + d_next)

    def sde_step(self, model_fn, x, t_cur: float, t_next: float, *, noise=None, model_kwargs=None) -> torch.Tensor:
        """Returns x at t_next < t_cur from one Euler-Maruyama step of SiT's reverse SDE (no noise if None).

        SiT's code integrates, in its time s = 1 - t, dx = [u + w score] ds + sqrt(2 w) dW. Here u = -v,
        score(x, t) = -E[eps | x_t = x] / t = -(x + (1 - t) v) / t for the linear interpolant (solve
        x = (1 - t) x_0 + t eps and v = eps - x_0 for eps), and w = SDE_DIFFUSION_NORM * t. The 1/t of the
        score cancels against w, so the drift -v - norm (x + (1 - t) v) is finite at every t. With
        h = t_cur - t_next > 0 (ds = h): x + h drift + sqrt(2 w h) noise.
        """
        h = t_cur - t_next
        velocity = self._velocity(model_fn, x, t_cur, model_kwargs)
        drift = -velocity - SDE_DIFFUSION_NORM * (x + (1 - t_cur) * velocity)
        x_next = x + h * drift
        if noise is not None:
            x_next = x_next + math.sqrt(2 * SDE_DIFFUSION_NORM * t_cur * h) * noise
        return x_next

    @staticmethod
    def time_grid(sampler: str, num_steps: int) -> list[float]:
        """Returns the num_steps + 1 times (Python floats) the sampler steps through, from 1.0 down to 0.0.

        euler and heun: uniform in t, 1 - i / num_steps, as SiT's fixed-step ODE solvers (whose num_steps
        counts grid points, so SiT's N is num_steps = N - 1 here). sde: uniform from 1 down to
        SDE_LAST_STEP_SIZE in num_steps - 1 Euler-Maruyama steps, then 0: SiT's SDE grid with SiT's N.
        """
        _check_num_steps(sampler, num_steps)
        if sampler == "sde":
            span = 1.0 - SDE_LAST_STEP_SIZE
            return [1.0 - span * i / (num_steps - 1) for i in range(num_steps)] + [0.0]
        return [1.0 - i / num_steps for i in range(num_steps + 1)]

    @torch.no_grad()
    def sample_loop(
        self,
        model_fn,
        shape,
        *,
        sampler: str = "euler",
        num_steps: int,
        model_kwargs=None,
        device=None,
        generators=None,
        noise=None,
        progress=False,
    ) -> torch.Tensor:
        """Returns samples x_0 of `shape`, integrated from noise at t = 1 to t = 0 with sampler_nfe() evaluations.

        euler / heun: the probability-flow ODE dx/dt = v_theta, deterministic given the initial noise.
        sde: SiT's Euler-Maruyama sampler (see sde_step and time_grid); the last step adds no noise.
        The initial noise is `noise` when given, else drawn per sample; with `generators` (one CPU
        torch.Generator per sample) the initial noise and every step's noise of sample i come from
        generators[i], so a sample does not depend on its batch or the number of processes.
        """
        grid = self.time_grid(sampler, num_steps)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            x = noise.to(device) if device is not None else noise
        else:
            x = randn_per_sample(shape, generators, device=device)
        steps = range(num_steps)
        if progress:
            from tqdm.auto import tqdm  # only needed when asked for

            steps = tqdm(steps)
        for i in steps:
            t_cur, t_next = grid[i], grid[i + 1]
            if sampler == "euler" or (sampler == "heun" and i == num_steps - 1):
                x = self.euler_step(model_fn, x, t_cur, t_next, model_kwargs=model_kwargs)
            elif sampler == "heun":
                x = self.heun_step(model_fn, x, t_cur, t_next, model_kwargs=model_kwargs)
            else:
                last = i == num_steps - 1
                step_noise = None if last else randn_per_sample(x.shape, generators, device=x.device, dtype=x.dtype)
                x = self.sde_step(model_fn, x, t_cur, t_next, noise=step_noise, model_kwargs=model_kwargs)
        return x


def create_flow(
    *,
    time_sampling: str = "uniform",
    logit_normal_loc: float = DEFAULT_LOGIT_NORMAL_LOC,
    logit_normal_scale: float = DEFAULT_LOGIT_NORMAL_SCALE,
) -> RectifiedFlow:
    """Returns the rectified-flow objective; time_sampling "uniform" (SiT, the default) or "logit_normal" (SD3).

    Uniform is the default because it is SiT's, the same DiT backbone on class-conditional ImageNet, and it
    weights every t alike, so the loss is the plain flow-matching loss; logit_normal(loc, scale) is SD3's
    reweighting toward mid-range t (SD3 Sec. 3.1, 5.1), also the setting of Liang et al. 2024's scaling laws.
    """
    return RectifiedFlow(
        time_sampling=time_sampling, logit_normal_loc=logit_normal_loc, logit_normal_scale=logit_normal_scale
    )
