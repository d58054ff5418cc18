"""The clipped PPO surrogate on per-step log-probs (DDPO/TexForce)."""
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
