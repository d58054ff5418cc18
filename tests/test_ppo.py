"""The clipped PPO surrogate on crafted ratios and advantages."""
import math

import torch

from rl.ppo import clipped_surrogate_loss, gaussian_kl


def test_loss_matches_formula_inside_and_outside_clip_range():
    eps = 0.1
    ratios = torch.tensor([1.05, 1.3, 0.7, 1.3, 0.7])
    advantages = torch.tensor([2.0, 1.0, 1.0, -1.0, -1.0])
    old = torch.zeros(5)
    new = torch.log(ratios)
    loss, metrics = clipped_surrogate_loss(new, old, advantages, eps)
    # per element: max(-A r, -A clip(r))
    expected = [
        -2.0 * 1.05,        # inside the range: unclipped
        -1.0 * 1.1,         # A>0, r above range: clipped at 1+eps (no incentive to go further)
        -1.0 * 0.7,         # A>0, r below range: the unclipped (worse) term wins
        1.0 * 1.3,          # A<0, r above range: unclipped (worse) term wins
        1.0 * 0.9,          # A<0, r below range: clipped at 1-eps
    ]
    assert math.isclose(loss.item(), sum(expected) / 5, rel_tol=1e-6)
    assert math.isclose(metrics["clipfrac"].item(), 4 / 5, rel_tol=1e-6)
    assert math.isclose(metrics["approx_kl"].item(), 0.5 * torch.mean(new**2).item(), rel_tol=1e-6)


def test_gradient_is_zero_where_clipped_and_improving():
    new = torch.log(torch.tensor([1.3, 1.05])).requires_grad_(True)
    loss, _ = clipped_surrogate_loss(new, torch.zeros(2), torch.tensor([1.0, 1.0]), 0.1)
    loss.backward()
    assert new.grad[0] == 0.0
    assert new.grad[1] < 0.0  # raising log-prob of a positive-advantage action lowers the loss


def test_on_policy_ratio_is_one():
    lp = torch.randn(8)
    loss, metrics = clipped_surrogate_loss(lp, lp.clone(), torch.ones(8), 1e-4)
    assert metrics["ratio"].item() == 1.0 and metrics["clipfrac"].item() == 0.0
    assert math.isclose(loss.item(), -1.0)


def test_gaussian_kl_is_the_closed_form_of_two_gaussians_with_one_sigma_averaged_over_dims():
    """KL(N(m, s^2) || N(r, s^2)) = (m - r)^2 / (2 s^2) per dimension, averaged like the log-prob."""
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    sigma = torch.tensor([0.5, 0.1])
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, sigma[:, None, None, None]),
        torch.distributions.Normal(ref, sigma[:, None, None, None]),
    ).mean((1, 2, 3))
    torch.testing.assert_close(gaussian_kl(mean, ref, sigma), expected)
    constant = gaussian_kl(torch.zeros(2, 4, 2, 2), torch.full((2, 4, 2, 2), 0.3), sigma)
    torch.testing.assert_close(constant, torch.tensor([0.18, 4.5]))  # 0.09 / (2 sigma^2)
