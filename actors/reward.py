"""Reward actor: scores uint8 images with their prompts; stateless, so a restart loses nothing."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rewards
from rl.config import RewardSettings
from rl.models import resolve_device
from rl.priority import lower_cpu_priority
from rl.sampling import images_to_float


@dataclass
class RewardScores:
    """scores: [B] float32 (NaN/inf kept); parts: name -> [B].

    The finiteness report is computed from the scores, not stored, so after `cat` its sample
    indices are positions in the whole epoch rather than in one shard.
    """

    scores: torch.Tensor
    parts: dict[str, torch.Tensor]

    @property
    def finite_report(self) -> rewards.FiniteReport:
        return rewards.check_finite(rewards.RewardOutput(self.scores, self.parts))

    @staticmethod
    def cat(parts: list["RewardScores"]) -> "RewardScores":
        return RewardScores(
            scores=torch.cat([p.scores for p in parts]),
            parts={k: torch.cat([p.parts[k] for p in parts]) for k in parts[0].parts},
        )


class RewardActor:
    """Plain class; `ray.remote(RewardActor)` where it is started, or used in-process."""

    def __init__(self, settings: RewardSettings, *, device: str = "auto", num_threads: int | None = None,
                 low_priority: bool = False, evaluation_spec: str | None = None, reward: rewards.Reward | None = None):
        """reward: `settings.spec` already built (a gradient learner's, for its evaluation), used instead of a copy."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = resolve_device(device)
        self.reward = reward or rewards.build_reward(settings.spec, device=self.device, paths=settings.paths)
        self.evaluation_reward = self.reward  # evaluation.reward, when it names another one
        if evaluation_spec is not None and evaluation_spec != settings.spec:
            self.evaluation_reward = rewards.build_reward(evaluation_spec, device=self.device, paths=settings.paths)
        if low_priority:  # its own process (Ray): yield the cores to a learner sharing them,
            lower_cpu_priority()  # once loaded, so a (re)start on a busy node is not starved

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], evaluation: bool = False,
              images_finite: torch.Tensor | None = None) -> RewardScores:
        """images: [B, 3, H, W] uint8; evaluation: score with the held-out evaluation's reward; images_finite: [B]
        bool, whether the sampler's image was finite before its uint8 rounding made NaN black (`SampledShard`): a
        non-finite one is given to the reward as NaN, which scores it NaN (`rewards.Reward`) for on_non_finite."""
        reward = self.evaluation_reward if evaluation else self.reward
        pixels = images_to_float(images.to(self.device))
        if images_finite is not None:
            pixels[~images_finite.to(self.device)] = float("nan")
        output = reward(pixels, prompts)
        return RewardScores(
            scores=output.scores.float().cpu(), parts={k: v.float().cpu() for k, v in output.parts.items()}
        )

    def ping(self) -> bool:
        return True
