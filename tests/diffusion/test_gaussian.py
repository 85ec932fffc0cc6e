"""Tests of harness.diffusion against closed forms, the public respacing, and tiny end-to-end sampler runs."""

import math

import pytest
import torch
from torch import nn

from harness.diffusion import (
    create_diffusion,
    get_named_beta_schedule,
    guided_model_fn,
    randn_per_sample,
    space_timesteps,
)
from harness.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl


class TinyEpsNet(nn.Module):
    """A stand-in for DiT: conv net taking (x, t, y), returning (N, 2C, H, W) (eps and v)."""

    def __init__(self, channels=2, num_classes=3, hidden=8):
        super().__init__()
        self.num_classes = num_classes
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.t_scale = nn.Linear(1, hidden)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)  # + 1: the null label
        self.conv_out = nn.Conv2d(hidden, 2 * channels, 3, padding=1)

    def forward(self, x, t, y=None):
        h = self.conv_in(x) + self.t_scale(t.float()[:, None] / 1000.0)[:, :, None, None]
        if y is not None:
            h = h + self.y_embed(y)[:, :, None, None]
        return torch.tanh(self.conv_out(torch.nn.functional.silu(h)))

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=None):
        # As the public DiT code: the first half of the batch is conditional, the second unconditional.
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        n_eps = cfg_channels if cfg_channels is not None else x.shape[1]
        eps, rest = out[:, :n_eps], out[:, n_eps:]
        cond_eps, uncond_eps = eps.split(len(eps) // 2)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def gaussian_data_oracle(diffusion_steps, data_std):
    """Returns model_fn(x_t, t) giving the exact E[eps | x_t] for data N(0, data_std^2), and v = 0."""
    alphas_cumprod = torch.cumprod(1 - get_named_beta_schedule("linear", diffusion_steps), 0)

    def model_fn(x, t):
        a = alphas_cumprod[t].to(x.dtype).reshape(-1, 1, 1, 1)
        # x_t = sqrt(a) x_0 + sqrt(1 - a) eps with x_0 ~ N(0, s^2):
        # E[eps | x_t] = sqrt(1 - a) x_t / (a s^2 + 1 - a).
        eps = (1 - a).sqrt() * x / (a * data_std**2 + 1 - a)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model_fn


# These tensors are tiny; on a shared 2-core machine intra-op threads only add contention (10x slower).
pytestmark = pytest.mark.usefixtures("one_thread")


# ----- schedule and respacing -----


def test_linear_schedule_is_float64_from_1e4_to_002():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == 1e-4 and betas[-1].item() == pytest.approx(0.02, rel=1e-15)
    assert bool((betas[1:] > betas[:-1]).all())
    with pytest.raises(ValueError, match="unknown noise_schedule 'quadratic'"):
        get_named_beta_schedule("quadratic", 1000)


def test_250_step_respacing_is_the_public_list():
    steps = space_timesteps(1000, "250")
    # The public algorithm spaces 250 steps over 0..999 with stride 999/249 = 4.012 and rounds: strides of
    # 4 except three of 5. So the list is NOT 0, 4, 8, ..., 996: it is 0, 4, ..., 164, 169, ..., 995, 999.
    assert len(steps) == 250
    assert steps == [round(i * 999 / 249) for i in range(250)]
    assert steps[:4] == [0, 4, 8, 12] and steps[-3:] == [991, 995, 999]
    strides = [b - a for a, b in zip(steps, steps[1:])]
    assert [steps[i] for i, s in enumerate(strides) if s == 5] == [164, 497, 830]
    assert set(strides) == {4, 5}


def test_ddim_respacing_and_bad_strings():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    sections = space_timesteps(1000, "10,20")  # 10 steps over 0..499, then 20 over 500..999
    assert len(sections) == 30 and sections[:1] + sections[9:11] + sections[-1:] == [0, 499, 500, 999]
    with pytest.raises(ValueError, match="ddim999"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="'fast'"):
        create_diffusion("fast")
    with pytest.raises(ValueError, match="cannot take 2000 steps"):
        create_diffusion("2000")


def test_respaced_schedule_is_rebuilt_from_alpha_bar():
    base = create_diffusion("")
    spaced = create_diffusion("250")
    assert base.num_timesteps == 1000 and spaced.num_timesteps == 250
    assert spaced.timestep_map.dtype == torch.long
    assert spaced.timestep_map.tolist() == space_timesteps(1000, "250")
    assert torch.equal(base.timestep_map, torch.arange(1000))
    # "" reproduces the base betas; respaced betas give exactly the base alpha-bar at the kept steps (Eq. 19).
    assert torch.allclose(base.betas, get_named_beta_schedule("linear", 1000), rtol=1e-12, atol=0)
    assert spaced.betas[0].item() == pytest.approx(1e-4, rel=1e-10)
    assert torch.allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12, atol=0)
    assert torch.allclose(torch.cumprod(1 - spaced.betas, 0), spaced.alphas_cumprod, rtol=1e-12, atol=0)
    # The rebuilt betas are ~4x the original ones (four merged steps), not the original betas subsampled.
    assert spaced.betas[100].item() == pytest.approx(
        1
        - base.alphas_cumprod[spaced.timestep_map[100]].item()
        / base.alphas_cumprod[spaced.timestep_map[99]].item()
    )
    assert spaced.betas[100] > 3.5 * base.betas[spaced.timestep_map[100]]
    assert create_diffusion(250).timestep_map.tolist() == spaced.timestep_map.tolist()  # YAML int accepted


def test_model_is_called_with_original_timesteps():
    diffusion = create_diffusion("250")
    seen = []

    def recording_model(x, t):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    diffusion.p_sample_loop(recording_model, (2, 1, 2, 2))
    assert [int(t[0]) for t in seen] == space_timesteps(1000, "250")[::-1]
    assert all(t.dtype == torch.long and t.shape == (2,) for t in seen)
    seen.clear()
    diffusion.training_losses(recording_model, torch.zeros(2, 1, 2, 2), torch.tensor([1, 249]))
    assert seen[0].tolist() == [4, 999]


# ----- closed forms -----


def test_q_sample_and_q_mean_variance_match_closed_form():
    diffusion = create_diffusion("")
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    t_list = [0, 10, 500, 999]
    alpha_bar = torch.tensor([math.prod(1 - b for b in betas[: t + 1]) for t in t_list], dtype=torch.float64)
    t = torch.tensor(t_list)
    x0 = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    a = alpha_bar.float().reshape(-1, 1, 1, 1)
    assert torch.allclose(diffusion.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    mean, variance, log_variance = diffusion.q_mean_variance(x0, t)
    assert torch.allclose(mean, a.sqrt() * x0, atol=1e-6)
    assert torch.allclose(variance.flatten(), (1 - alpha_bar).float(), rtol=1e-5)
    assert torch.allclose(log_variance.flatten(), torch.log(1 - alpha_bar).float(), rtol=1e-5)
    # And q_sample's empirical moments over many draws.
    x0_const = torch.full((20000, 1, 1, 1), 0.7)
    t500 = torch.full((20000,), 500)
    torch.manual_seed(2)
    draws = diffusion.q_sample(x0_const, t500).flatten()
    a500 = alpha_bar[2].item()
    assert draws.mean().item() == pytest.approx(math.sqrt(a500) * 0.7, abs=0.03)
    assert draws.var().item() == pytest.approx(1 - a500, rel=0.05)


def test_posterior_matches_bayes_rule():
    diffusion = create_diffusion("250")
    t = torch.tensor([1, 50, 249])
    x0 = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xt = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mean, variance, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    # Independently: q(x_{t-1} | x_0) = N(sqrt(ab_prev) x_0, 1 - ab_prev) times q(x_t | x_{t-1}) =
    # N(sqrt(alpha_t) x_{t-1}, beta_t), as a Gaussian in x_{t-1}: precisions add, means weight by precision.
    ab = diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    ab_prev = diffusion.alphas_cumprod[t - 1].reshape(-1, 1, 1, 1)
    alpha_t = ab / ab_prev
    beta_t = 1 - alpha_t
    precision = 1 / (1 - ab_prev) + alpha_t / beta_t
    expected_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + alpha_t.sqrt() * xt / beta_t) / precision
    assert torch.allclose(mean, expected_mean, rtol=1e-10)
    assert torch.allclose(variance.flatten(), (1 / precision).flatten(), rtol=1e-10)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean1, mean2 = (
        torch.randn(50, generator=g, dtype=torch.float64),
        torch.randn(50, generator=g, dtype=torch.float64),
    )
    logvar1 = torch.randn(50, generator=g, dtype=torch.float64)
    logvar2 = torch.randn(50, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean1, (0.5 * logvar1).exp()),
        torch.distributions.Normal(mean2, (0.5 * logvar2).exp()),
    )
    assert torch.allclose(normal_kl(mean1, logvar1, mean2, logvar2), expected, rtol=1e-10)
    assert torch.allclose(normal_kl(mean1, logvar1, mean1, logvar1), torch.zeros(50, dtype=torch.float64))


def test_discretized_gaussian_log_likelihood_matches_normal_cdf():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 values of uint8 data mapped to [-1, 1]
    for mean, log_scale in [(0.0, math.log(0.1)), (0.9, math.log(0.01)), (-0.95, math.log(0.3))]:
        means = torch.full_like(levels, mean)
        log_scales = torch.full_like(levels, log_scale)
        log_p = discretized_gaussian_log_likelihood(levels, means=means, log_scales=log_scales)
        normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), math.exp(log_scale))
        upper = torch.where(levels > 0.999, torch.ones_like(levels), normal.cdf(levels + 1 / 255))
        lower = torch.where(levels < -0.999, torch.zeros_like(levels), normal.cdf(levels - 1 / 255))
        expected = torch.log((upper - lower).clamp(min=1e-12))
        assert torch.allclose(log_p, expected, rtol=1e-6, atol=1e-9)
        # The 256 bins cover the real line, so the probabilities sum to one.
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_learned_range_interpolates_between_posterior_and_beta():
    diffusion = create_diffusion("250")
    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([0, 10, 249])
    eps = torch.zeros_like(x)
    for v, table in [(1.0, torch.log(diffusion.betas)), (-1.0, diffusion.posterior_log_variance_clipped)]:
        out = diffusion._p_mean_variance_from_output(torch.cat([eps, torch.full_like(x, v)], 1), x, t)
        assert torch.allclose(out["log_variance"][:, 0, 0, 0], table[t].float(), rtol=1e-6)
    middle = diffusion._p_mean_variance_from_output(torch.cat([eps, torch.zeros_like(x)], 1), x, t)
    expected = 0.5 * (torch.log(diffusion.betas) + diffusion.posterior_log_variance_clipped)[t]
    assert torch.allclose(middle["log_variance"][:, 0, 0, 0], expected.float(), rtol=1e-6)


# ----- training loss -----


def test_training_losses_finite_and_vb_trains_only_the_variance():
    diffusion = create_diffusion("")
    x0 = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([0, 1, 500, 999])
    output = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    terms = diffusion.training_losses(lambda x, t: output, x0, t)
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(v.shape == (4,) and bool(torch.isfinite(v).all()) for v in terms.values())
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert torch.count_nonzero(grad_vb[:, :2]) == 0  # eps channels: stop-gradient on the mean
    assert bool((grad_vb[:, 2:].abs().sum(dim=(1, 2, 3)) > 0).all())  # v channels learn from the bound
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert torch.count_nonzero(grad_mse[:, 2:]) == 0 and torch.count_nonzero(grad_mse[:, :2]) > 0


def test_training_losses_with_tiny_model_backprop_and_fixed_variance():
    model = TinyEpsNet()
    diffusion = create_diffusion("")
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    terms = diffusion.training_losses(
        model, x0, torch.tensor([0, 3, 999]), model_kwargs={"y": torch.tensor([0, 1, 2])}
    )
    terms["loss"].mean().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    fixed = create_diffusion("", learn_sigma=False)
    terms = fixed.training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([0, 3, 999]))
    assert torch.equal(terms["vb"], torch.zeros(3)) and torch.allclose(terms["loss"], terms["mse"])
    with pytest.raises(ValueError, match="needs 4 output channels"):
        diffusion.training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([0, 3, 999]))


# ----- sampling -----


@pytest.mark.parametrize("respacing", ["", "250"])
def test_ddpm_sampler_recovers_gaussian_data_with_an_exact_model(respacing):
    # With the exact denoiser for data N(0, 0.5^2) the ancestral sampler must turn N(0, 1) noise into
    # N(0, 0.5^2); a wrong respaced schedule or a wrong timestep map would miss the target variance.
    data_std = 0.5
    diffusion = create_diffusion(respacing)
    torch.manual_seed(0)
    sample = diffusion.p_sample_loop(gaussian_data_oracle(1000, data_std), (4000, 1, 1, 1))
    assert sample.std().item() == pytest.approx(data_std, rel=0.05)
    assert abs(sample.mean().item()) < 0.05


def test_ddim_with_an_exact_model_is_the_closed_form_linear_map():
    # For Gaussian data and the exact denoiser each DDIM step (eta = 0) is x_{t-1} = k_t x_t with
    # k_t = (sqrt(ab_prev ab) s^2 + sqrt((1 - ab_prev)(1 - ab))) / (ab s^2 + 1 - ab), so x_0 = (prod k_t) x_T.
    data_std = 0.5
    diffusion = create_diffusion("ddim50")
    ab, ab_prev = diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev
    k = ((ab_prev * ab).sqrt() * data_std**2 + ((1 - ab_prev) * (1 - ab)).sqrt()) / (
        ab * data_std**2 + 1 - ab
    )
    noise = torch.randn(64, 1, 1, 1, dtype=torch.float64)
    sample = diffusion.ddim_sample_loop(gaussian_data_oracle(1000, data_std), noise.shape, noise=noise)
    assert torch.allclose(sample, k.prod() * noise, rtol=1e-9)
    # 50 deterministic steps shrink the spread a little (0.472 for 0.5): DDIM's known coarse-step bias.
    assert k.prod().item() == pytest.approx(0.4724, abs=1e-3)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    diffusion = create_diffusion("ddim10")
    model = TinyEpsNet()
    noise = torch.randn(2, 2, 4, 4)
    kwargs = {"y": torch.tensor([0, 2])}
    torch.manual_seed(1)
    a = diffusion.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs=kwargs)
    torch.manual_seed(2)
    b = diffusion.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs=kwargs)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = diffusion.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs=kwargs, eta=1.0)
    torch.manual_seed(2)
    d = diffusion.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs=kwargs, eta=1.0)
    assert not torch.allclose(c, d)


def test_ddpm_sampler_with_tiny_model_shape_and_finite():
    diffusion = create_diffusion("25")
    model = TinyEpsNet()
    out = diffusion.p_sample_loop(
        model, (3, 2, 4, 4), model_kwargs={"y": torch.tensor([0, 1, 2])}, progress=False
    )
    assert out.shape == (3, 2, 4, 4) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_per_sample_generators_make_samples_batch_independent(sampler):
    diffusion = create_diffusion("10")
    model = TinyEpsNet()
    labels = torch.tensor([0, 1, 2, 0])

    def run(indices):
        generators = [torch.Generator().manual_seed(i) for i in indices]
        kwargs = {"y": labels[indices]}
        shape = (len(indices), 2, 4, 4)
        if sampler == "ddpm":
            return diffusion.p_sample_loop(model, shape, model_kwargs=kwargs, generators=generators)
        return diffusion.ddim_sample_loop(model, shape, model_kwargs=kwargs, generators=generators, eta=1.0)

    torch.manual_seed(123)  # the global RNG must not matter
    whole = run([0, 1, 2, 3])
    torch.manual_seed(456)
    halves = torch.cat([run([0, 1]), run([2, 3])])
    assert torch.allclose(whole, halves, atol=1e-5)
    assert not torch.allclose(whole[0], whole[3], atol=1e-3)  # different seeds give different samples
    with pytest.raises(ValueError, match="one generator per sample"):
        randn_per_sample((3, 1), [torch.Generator()])


def test_guided_model_fn_combines_conditional_and_null_outputs():
    model = TinyEpsNet(channels=2, num_classes=3)
    x = torch.randn(2, 2, 4, 4)
    t = torch.tensor([10, 900])
    y = torch.tensor([0, 2])
    null = torch.full_like(y, 3)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        guided = guided_model_fn(model, 4.0, null_label=3)(x, t, y)
        partial = guided_model_fn(model, 4.0, cfg_channels=1, null_label=3)(x, t, y)
        unit = guided_model_fn(model, 1.0, null_label=3)(x, t, y)
    assert guided.shape == (2, 4, 4, 4)
    assert torch.allclose(guided[:, :2], uncond[:, :2] + 4.0 * (cond[:, :2] - uncond[:, :2]), atol=1e-5)
    assert torch.allclose(guided[:, 2:], cond[:, 2:], atol=1e-6)  # variance from the conditional half
    assert torch.allclose(partial[:, :1], guided[:, :1], atol=1e-6)
    assert torch.allclose(partial[:, 1:], cond[:, 1:], atol=1e-6)  # channel 1 not guided
    assert torch.allclose(unit, cond, atol=1e-6)
    with pytest.raises(ValueError, match="null_label"):
        guided_model_fn(model, 4.0)
    # The guided function plugs straight into a sampler.
    sample = create_diffusion("5").p_sample_loop(
        guided_model_fn(model, 1.5, null_label=3), (2, 2, 4, 4), model_kwargs={"y": y}
    )
    assert sample.shape == (2, 2, 4, 4) and bool(torch.isfinite(sample).all())
