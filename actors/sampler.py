"""Sampler worker: a pipeline carrying the policy LoRA; rolls out trajectories for prompt shards."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from rl.config import TexForceConfig
from rl.ddim import DDIMSchedule
from rl.learner import learned_latent_positions
from rl.lora import PolicyWeights, add_lora, set_policy_weights
from rl.models import load_pipeline_from_config
from rl.priority import lower_cpu_priority
from rl.sampling import sample_trajectories

log = logging.getLogger("texforce")


@dataclass(frozen=True)
class SampledShard:
    """What a `sample` call returns first, a few bytes for the driver to wait on: the LoRA version that drew the
    shard, and which of its images were finite before their uint8 rounding ([B] bool)."""

    version: int
    images_finite: torch.Tensor


class SamplerWorker:
    """Plain class; `ray.remote(SamplerWorker)` where it is started, or used in-process.

    `pipe` may be passed in (inline mode shares the learner's pipeline); otherwise it is loaded
    from the config and given a LoRA of the config's shape, whose values come with each call.
    """

    def __init__(self, config: TexForceConfig, *, pipe=None, num_threads: int | None = None, low_priority: bool = False):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.config = config
        if pipe is None:
            pipe = load_pipeline_from_config(config.model)
            add_lora(pipe, config.lora)
        self.pipe = pipe
        self.version = -1
        if low_priority:  # its own process (Ray): yield the cores to a learner sharing them,
            lower_cpu_priority()  # once loaded, so a (re)start on a busy node is not starved

    def sample(self, weights: PolicyWeights, prompts: list[str], seeds: list[int], start_seeds: list[int] | None = None,
               evaluation: bool = False) -> tuple:
        """(SampledShard, images, *trajectories) for `prompts` with per-sample `seeds` (x_T from `start_seeds`
        if given) under `weights`: the version of the LoRA that drew them and which images were finite, a few
        bytes for the driver to wait on; the uint8 images, which the reward actors read; and each sample's
        trajectory as its own object, without its image, so that on Ray a learner rank fetches only the samples it
        trains on (call with num_returns=2 + len(prompts); 2 with evaluation). On Ray the images and
        trajectories stay in the object store until the reward actors and learners read them.

        The weights travel with every call, so a restarted worker re-run on the same shard gives
        the same samples (the call is idempotent). evaluation: held-out images, drawn at
        `evaluation.eta`; (SampledShard, images) only, since nothing trains on them. A trajectory keeps only
        the latents the learner reads (`learned_latent_positions`: x_t and x_{t-1} of the steps the
        config lets it train), not the whole chain.
        """
        self.sample_with(weights)
        s = self.config.sample
        eta = self.config.evaluation_eta if evaluation else s.eta
        trajectories = sample_trajectories(
            self.pipe, prompts, seeds, num_steps=s.num_steps, guidance_scale=s.guidance_scale, eta=eta,
            negative_prompt=s.negative_prompt, height=s.height, width=s.width, policy_version=weights.version,
            start_seeds=start_seeds,
        )
        drawn = SampledShard(weights.version, trajectories.images_finite)
        if not bool(trajectories.images_finite.all()):
            broken = torch.nonzero(~trajectories.images_finite).flatten().tolist()
            log.warning("samples %s of this shard (prompts %s) decoded to non-finite images (NaN/inf out of the VAE: "
                        "the sampling diverged); their rewards are NaN (reward.on_non_finite)", broken,
                        [prompts[i] for i in broken])
        if evaluation:
            return drawn, trajectories.images
        schedule = DDIMSchedule.from_scheduler(self.pipe.scheduler, s.num_steps)
        learned = learned_latent_positions(schedule, s.eta, self.config.train)
        rows = replace(trajectories, images=None, images_finite=None).keep_latents(learned)
        return drawn, trajectories.images, *(rows.select([i]) for i in range(len(rows)))

    def sample_with(self, weights: PolicyWeights) -> None:
        """Put `weights` into the pipeline unless they are already there."""
        if weights.version != self.version:
            set_policy_weights(self.pipe, weights)
            self.version = weights.version

    def ping(self) -> int:
        return self.version
