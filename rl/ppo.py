"""The clipped PPO surrogate on per-step log-probs (DDPO/TexForce), and the KL to the base model."""
from __future__ import annotations

import torch


def clipped_surrogate_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss for one step of each trajectory.

    log_prob: [B] under the current policy (carries the gradient); old_log_prob: [B] from the
    sampler; advantages: [B] (already clipped). Returns the scalar loss
    mean(max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps))) and detached metrics.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    with torch.no_grad():
        metrics = {
            "approx_kl": 0.5 * torch.mean((log_prob - old_log_prob) ** 2),
            "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()),
            "ratio": ratio.mean(),
        }
    return loss, metrics


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, sigma^2 I) || N(ref_mean, sigma^2 I)) of one DDIM step, [B].

    Both policies share sigma_t (it depends on the schedule only), so the KL is the squared
    distance of the means over 2 sigma^2; averaged over dimensions like the log-prob.
    mean, ref_mean: [B, C, H, W]; sigma: [B].
    """
    return ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * sigma**2)
