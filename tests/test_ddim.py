"""The DDIM policy step: its sample matches diffusers, its log-prob matches a Gaussian density."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from rl.ddim import DDIMSchedule, ddim_sigma, ddim_step_gain, ddim_step_with_logprob


def _scheduler(**kw):
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw,
    )


def test_step_matches_diffusers_ddim_step():
    scheduler = _scheduler()
    schedule = DDIMSchedule.from_scheduler(scheduler, 20)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    for j in (0, 7, 19):
        t = schedule.timesteps[j]
        expected = scheduler.step(eps, t, x_t, eta=0.7, variance_noise=noise).prev_sample
        got, _, _, _ = ddim_step_with_logprob(schedule, eps, torch.full((2,), int(t)), x_t, eta=0.7, noise=noise)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_step_clips_x0_as_diffusers_does_when_the_scheduler_says_so():
    """diffusers' DDIMScheduler defaults to clip_sample=True (x0_hat clamped to +-clip_sample_range): an
    epsilon that puts x0_hat out of range must give diffusers' step, at either range."""
    g = torch.Generator().manual_seed(3)
    x_t, eps, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for clip_range in (1.0, 0.5):
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=True,
                                  clip_sample_range=clip_range, set_alpha_to_one=False, steps_offset=1)
        schedule = DDIMSchedule.from_scheduler(scheduler, 10)
        t = schedule.timesteps[5]
        expected = scheduler.step(3 * eps, t, x_t, eta=1.0, variance_noise=noise).prev_sample
        got, _, _, _ = ddim_step_with_logprob(schedule, 3 * eps, torch.full((2,), int(t)), x_t, eta=1.0, noise=noise)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        unclipped = DDIMScheduler.from_config({**scheduler.config, "clip_sample": False})
        unclipped.set_timesteps(10)  # the clamp changed this step: without it the step differs
        assert not torch.allclose(unclipped.step(3 * eps, t, x_t, eta=1.0, variance_noise=noise).prev_sample, got)


def test_log_prob_is_gaussian_density_averaged_over_dims():
    scheduler = _scheduler()
    schedule = DDIMSchedule.from_scheduler(scheduler, 10)
    g = torch.Generator().manual_seed(1)
    x_t, eps, x_prev = (torch.randn(3, 4, 6, 6, generator=g) for _ in range(3))
    t = torch.tensor([901, 501, 1])  # differs across the batch
    eta = 1.0
    _, log_prob, _, _ = ddim_step_with_logprob(schedule, eps, t, x_t, eta=eta, prev_sample=x_prev)
    # by hand, per sample, from the equations
    abar = scheduler.alphas_cumprod
    for b in range(3):
        tb = int(t[b])
        a_t = abar[tb]
        prev = tb - 100
        a_prev = abar[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        x0 = (x_t[b] - (1 - a_t).sqrt() * eps[b]) / a_t.sqrt()
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        mean = a_prev.sqrt() * x0 + math.sqrt(1 - a_prev - sigma**2) * eps[b]
        density = torch.distributions.Normal(mean, sigma).log_prob(x_prev[b]).mean()
        torch.testing.assert_close(log_prob[b], density, rtol=1e-5, atol=1e-5)


def test_batched_timesteps_equal_one_by_one():
    schedule = DDIMSchedule.from_scheduler(_scheduler(), 10)
    g = torch.Generator().manual_seed(2)
    x_t, eps, x_prev = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    t = schedule.timesteps[[0, 4, 9]]
    _, batched, _, _ = ddim_step_with_logprob(schedule, eps, t, x_t, eta=1.0, prev_sample=x_prev)
    for b in range(3):
        _, single, _, _ = ddim_step_with_logprob(
            schedule, eps[b : b + 1], t[b : b + 1], x_t[b : b + 1], eta=1.0, prev_sample=x_prev[b : b + 1]
        )
        torch.testing.assert_close(batched[b : b + 1], single)


def test_sampled_action_is_most_likely_at_the_mean():
    schedule = DDIMSchedule.from_scheduler(_scheduler(), 10)
    x_t, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    t = schedule.timesteps[:1]
    _, _, mean, _ = ddim_step_with_logprob(schedule, eps, t, x_t, eta=1.0, noise=torch.zeros_like(x_t))
    _, at_mean, _, _ = ddim_step_with_logprob(schedule, eps, t, x_t, eta=1.0, prev_sample=mean)
    _, off_mean, _, _ = ddim_step_with_logprob(schedule, eps, t, x_t, eta=1.0, prev_sample=mean + 0.1)
    assert at_mean > off_mean


def test_v_prediction_matches_diffusers():
    scheduler = _scheduler(prediction_type="v_prediction")
    schedule = DDIMSchedule.from_scheduler(scheduler, 10)
    x_t, v, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    t = schedule.timesteps[3]
    expected = scheduler.step(v, t, x_t, eta=1.0, variance_noise=noise).prev_sample
    got, _, _, _ = ddim_step_with_logprob(schedule, v, t.reshape(1), x_t, eta=1.0, noise=noise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_set_alpha_to_one_is_rejected():
    scheduler = DDIMScheduler(set_alpha_to_one=True)
    try:
        DDIMSchedule.from_scheduler(scheduler, 10)
    except ValueError as error:
        assert "set_alpha_to_one" in str(error)
    else:
        raise AssertionError("expected a ValueError")


def test_eta_zero_is_plain_ddim_with_undefined_log_prob():
    scheduler = _scheduler()
    schedule = DDIMSchedule.from_scheduler(scheduler, 10)
    x_t, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = schedule.timesteps[2]
    expected = scheduler.step(eps, t, x_t, eta=0.0).prev_sample
    got, log_prob, _, sigma = ddim_step_with_logprob(schedule, eps, t.repeat(2), x_t, eta=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(sigma == 0) and torch.isnan(log_prob).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_step_gain_is_the_autograd_derivative_of_the_step_mean_over_sigma(prediction_type, eta):
    schedule = DDIMSchedule.from_scheduler(_scheduler(prediction_type=prediction_type), 10)
    t = schedule.timesteps  # every step, the step onto t=1 and the last one included
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(len(t), 4, 3, 3, generator=g)
    model_output = torch.randn(len(t), 4, 3, 3, generator=g, requires_grad=True)
    _, _, mean, sigma = ddim_step_with_logprob(schedule, model_output, t, x_t, eta=eta)
    # the mean is elementwise linear in the model output: d mean / d output is one c_t per step
    (c,) = torch.autograd.grad(mean.sum(), model_output)
    assert torch.allclose(c, c[:, :1, :1, :1].expand_as(c))
    expected = c[:, 0, 0, 0].abs() / sigma
    torch.testing.assert_close(ddim_step_gain(schedule, t, eta), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("num_steps", [10, 20, 50])
def test_step_gain_at_eta_one_is_sqrt_of_the_snr_ratio_minus_one(num_steps):
    schedule = DDIMSchedule.from_scheduler(_scheduler(), num_steps)
    t = schedule.timesteps
    abar_t, abar_prev = schedule.alpha_bar(t).double(), schedule.alpha_bar(schedule.prev_timestep(t)).double()
    snr_t, snr_prev = abar_t / (1 - abar_t), abar_prev / (1 - abar_prev)
    expected = (snr_prev / snr_t - 1).sqrt()
    torch.testing.assert_close(ddim_step_gain(schedule, t, 1.0).double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("source", ["sd", "tiny"])
@pytest.mark.parametrize(("num_steps", "onto_one"), [(10, 8.32), (20, 5.43), (50, 3.27)])
def test_the_step_onto_t1_is_the_gain_outlier_not_the_smallest_sigma(source, num_steps, onto_one, request):
    """SD's config (leading spacing, steps_offset=1) and the tiny model's: one step has a large gain."""
    if source == "tiny":
        scheduler = DDIMScheduler.from_pretrained(request.getfixturevalue("tiny_sd_dir"), subfolder="scheduler")
    else:
        scheduler = _scheduler()
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.steps_offset == 1
    schedule = DDIMSchedule.from_scheduler(scheduler, num_steps)
    gain = ddim_step_gain(schedule, schedule.timesteps, 1.0)
    sigma = ddim_sigma(schedule, schedule.timesteps, 1.0)
    # the step onto t=1 (second to last) jumps in SNR and is the outlier
    assert int(schedule.prev_timestep(schedule.timesteps)[-2]) == 1
    assert int(gain.argmax()) == num_steps - 2
    assert gain[-2].item() == pytest.approx(onto_one, abs=0.01)
    others = torch.cat([gain[:-2], gain[-1:]])
    assert 0.35 < others.min() and others.max() < 1.35
    # it carries most of the score-noise variance (86% / 73% / 49%)
    share = gain[-2] ** 2 / (gain**2).sum()
    assert share.item() == pytest.approx({10: 0.86, 20: 0.73, 50: 0.49}[num_steps], abs=0.01)
    # the last step has the smallest sigma but an ordinary gain of 1
    assert int(sigma.argmin()) == num_steps - 1
    assert gain[-1].item() == pytest.approx(1.0, abs=0.01)
