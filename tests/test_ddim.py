"""The DDIM policy step: its sample matches diffusers, its log-prob matches a Gaussian density."""
import math

import torch
from diffusers import DDIMScheduler

from rl.ddim import DDIMSchedule, ddim_step_with_logprob


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
