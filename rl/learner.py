"""The PPO learner: advantages and clipped updates on the LoRA of a Stable Diffusion pipeline.

Pure PyTorch. The Ray learner actor wraps this class; with torch.distributed initialised
(Ray Train), gradients are all-reduced before every optimizer step, so L learners on L
shards take the same step as one learner on the union batch.

The text encoder runs forward and backward once per minibatch: its output embeddings are
the only path from the loss to its weights, so d(loss)/d(embeddings) is accumulated on
detached leaves over the trained timesteps and then backpropagated through the encoder once.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from rl.config import ConfigError, TexForceConfig
from rl.ddim import DDIMSchedule, ddim_sigma, ddim_step_gain
from rl.lora import (
    PolicyWeights,
    adapters_disabled,
    add_lora,
    get_policy_weights,
    set_policy_weights,
)
from rl.ppo import clipped_surrogate_loss, gaussian_kl
from rl.sampling import Trajectories, encode, step_distribution


def warmup_cosine(warmup_steps: int, total_steps: int, schedule: str):
    """LR multiplier: linear warmup, then cosine decay to 0 (or constant)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def trainable_steps(
    schedule: DDIMSchedule, eta: float, min_sigma: float, *, max_step_gain: float = 0.0
) -> torch.Tensor:
    """Indices [K] of the sampling steps the learner may train: sigma_t >= min_sigma and, unless
    max_step_gain is 0, gain <= max_step_gain (`ddim_step_gain`, the size of a step's score noise)."""
    sigma = ddim_sigma(schedule, schedule.timesteps, eta)
    keep = sigma >= min_sigma
    if not keep.any():
        raise ConfigError(
            f"train.min_sigma={min_sigma} leaves no step to train: the largest sigma_t of this "
            f"{schedule.num_steps}-step schedule at eta={eta} is {sigma.max().item():.3g}; lower train.min_sigma"
        )
    if max_step_gain != 0:
        gain = ddim_step_gain(schedule, schedule.timesteps, eta)
        if not (keep & (gain <= max_step_gain)).any():
            raise ConfigError(
                f"train.max_step_gain={max_step_gain} leaves no step to train: the smallest gain of this "
                f"{schedule.num_steps}-step schedule at eta={eta} (with train.min_sigma={min_sigma}) is "
                f"{gain[keep].min().item():.3g}; raise train.max_step_gain"
            )
        keep &= gain <= max_step_gain
    return torch.nonzero(keep).flatten()


def _world_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class PPOLearner:
    """Owns the trainable LoRA, its optimizer and LR schedule; takes batches with advantages.

    Advantages are computed by the caller (the driver holds the per-prompt statistics for the
    whole batch, so L learners see the same advantages as one).
    """

    def __init__(self, pipe, config: TexForceConfig, *, world_size: int = 1):
        self.pipe = pipe
        self.config = config
        self.train = config.train
        self.sample = config.sample
        self.policy = config.lora.policy
        self.train_text_encoder = self.policy in ("text_encoder", "both")
        torch.manual_seed(config.seed)  # LoRA init
        self.params = add_lora(pipe, config.lora)
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=self.train.learning_rate,
            betas=(self.train.adam_beta1, self.train.adam_beta2),
            eps=self.train.adam_epsilon,
            weight_decay=self.train.weight_decay,
        )
        samples_per_learner = config.samples_per_epoch // world_size
        steps_per_epoch = math.ceil(samples_per_learner / (self.train.batch_size * self.train.gradient_accumulation_steps))
        total_steps = steps_per_epoch * self.train.num_inner_epochs * config.num_epochs
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.train.warmup_steps, total_steps, self.train.lr_schedule)
        )
        self.schedule = DDIMSchedule.from_scheduler(pipe.scheduler, self.sample.num_steps)
        self.trainable_steps = trainable_steps(
            self.schedule, self.sample.eta, self.train.min_sigma, max_step_gain=self.train.max_step_gain
        )
        self.generator = torch.Generator().manual_seed(config.seed + 1)  # shuffles, timestep subsets
        self.version = 0

    # --- the update ------------------------------------------------------------------------

    def update(self, trajectories: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        """`num_inner_epochs` passes of minibatch PPO over this batch; returns mean metrics.

        Every rank gets the whole batch and draws the same shuffle; rank r trains rows
        [r*b, (r+1)*b) of each global minibatch of world*b rows, so the all-reduced gradient
        is the gradient of the union minibatch.
        """
        num_samples, num_steps = trajectories.log_probs.shape
        if num_steps != self.schedule.num_steps:
            raise ValueError(f"trajectories have {num_steps} steps, the learner's schedule {self.schedule.num_steps}")
        steps = self.trainable_steps
        num_trained = max(1, int(len(steps) * self.train.timestep_fraction))
        bs, accumulate = self.train.batch_size, self.train.gradient_accumulation_steps
        world, rank = _world_and_rank()
        history: dict[str, list[float]] = {}
        first = True
        for _ in range(self.train.num_inner_epochs):
            # 1. shuffle samples, and pick each sample's trained steps at random among the trainable ones
            order = torch.randperm(num_samples, generator=self.generator)
            step_index = torch.stack([steps[torch.randperm(len(steps), generator=self.generator)] for _ in range(num_samples)])
            starts = list(range(0, num_samples, bs * world))
            for i, start in enumerate(starts):
                rows = order[start : start + bs * world][rank * bs : (rank + 1) * bs]
                # 2. accumulate gradients of this rank's share of the minibatch
                metrics = self.minibatch_backward(
                    trajectories.select(rows), advantages[rows], step_index[rows, :num_trained], 1.0 / accumulate
                )
                if first:  # before any optimizer step: the learner must agree with the sampler
                    metrics["logprob_mismatch"] = metrics.pop("abs_logprob_diff")
                    first = False
                else:
                    metrics.pop("abs_logprob_diff")
                # 3. optimizer step every `accumulate` minibatches (and at the end)
                if (i + 1) % accumulate == 0 or i == len(starts) - 1:
                    metrics.update(self.optimizer_step())
                for key, value in metrics.items():
                    history.setdefault(key, []).append(value)
        self.version += 1
        summary = {key: float(np.mean(values)) for key, values in history.items()}
        summary["policy_version"] = self.version
        return summary

    def minibatch_backward(
        self, batch: Trajectories, advantages: torch.Tensor, step_index: torch.Tensor, loss_scale: float = 1.0
    ) -> dict[str, float]:
        """Accumulate d(loss)/d(LoRA) for one minibatch into `.grad`.

        step_index: [b, K] which stored steps of each trajectory to train on. The loss is the
        PPO surrogate, plus kl_coef times the KL to the base model's step, averaged over the K
        steps, times `loss_scale`.
        """
        device = self.pipe.unet.device
        use_kl = self.train.kl_coef > 0
        sums = {"loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "ratio": 0.0, "abs_logprob_diff": 0.0}
        if use_kl:
            sums["kl_to_base"] = 0.0
        if len(batch) == 0:  # an uneven last minibatch can leave a rank without rows
            return sums | {"ratio": 1.0}
        # 1. encode prompt and negative prompt once, then cut the graph at the embeddings
        with torch.set_grad_enabled(self.train_text_encoder):
            cond = encode(self.pipe.text_encoder, batch.prompt_ids)
            uncond = encode(self.pipe.text_encoder, batch.negative_ids)
        cond_leaf = cond.detach().requires_grad_(self.train_text_encoder)
        uncond_leaf = uncond.detach().requires_grad_(self.train_text_encoder)
        if use_kl and self.train_text_encoder:  # the base model's embeddings
            with torch.no_grad(), adapters_disabled(self.pipe, self.policy):
                ref_cond = encode(self.pipe.text_encoder, batch.prompt_ids)
                ref_uncond = encode(self.pipe.text_encoder, batch.negative_ids)
        else:  # a frozen text encoder: the policy's embeddings are the base model's
            ref_cond, ref_uncond = cond, uncond
        # 2. per trained step: recompute log-prob, PPO loss (+ KL), backward to the leaves (and U-Net LoRA)
        rows = torch.arange(len(batch))
        advantages = advantages.to(device)
        num_trained = step_index.shape[1]
        guidance, eta = self.sample.guidance_scale, self.sample.eta
        for k in range(num_trained):
            j = step_index[:, k]
            x_t = batch.latents[rows, j].to(device)
            t = batch.timesteps[rows, j].to(device)
            x_prev = batch.latents[rows, j + 1].to(device)
            log_prob, mean, sigma = step_distribution(
                self.pipe.unet, self.schedule, x_t, t, x_prev, cond_leaf, uncond_leaf, guidance_scale=guidance, eta=eta
            )
            old_log_prob = batch.log_probs[rows, j].to(device)
            loss, metrics = clipped_surrogate_loss(log_prob, old_log_prob, advantages, self.train.clip_range)
            if use_kl:  # closed-form KL of this step to the base model's, at the same x_t
                with torch.no_grad(), adapters_disabled(self.pipe, self.policy):
                    _, ref_mean, _ = step_distribution(
                        self.pipe.unet, self.schedule, x_t, t, x_prev, ref_cond, ref_uncond, guidance_scale=guidance, eta=eta
                    )
                kl = gaussian_kl(mean, ref_mean, sigma).mean()
                loss = loss + self.train.kl_coef * kl
                sums["kl_to_base"] += kl.item() / num_trained
            (loss * loss_scale / num_trained).backward()
            sums["loss"] += loss.item() / num_trained
            for key in ("approx_kl", "clipfrac", "ratio"):
                sums[key] += metrics[key].item() / num_trained
            sums["abs_logprob_diff"] += (log_prob - old_log_prob).abs().max().item() / num_trained
        # 3. one backward through the text encoder with the accumulated embedding gradients
        if self.train_text_encoder:
            torch.autograd.backward([cond, uncond], [cond_leaf.grad, uncond_leaf.grad])
        return sums

    def optimizer_step(self) -> dict[str, float]:
        """All-reduce (if distributed), clip, step, zero; returns grad_norm and lr."""
        world, _ = _world_and_rank()
        if world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.train.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "lr": lr}

    # --- weights and checkpoints -----------------------------------------------------------

    def get_weights(self) -> PolicyWeights:
        return get_policy_weights(self.pipe, self.policy, self.version)

    def state_dict(self) -> dict:
        """Everything needed to resume: LoRA, optimizer, LR schedule, shuffling RNG, version."""
        return {
            "lora": {"text_encoder": (w := self.get_weights()).text_encoder, "unet": w.unet},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "version": self.version,
        }

    def load_state_dict(self, state: dict) -> None:
        lora = state["lora"]
        set_policy_weights(self.pipe, PolicyWeights(state["version"], lora["text_encoder"], lora["unet"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        self.version = state["version"]
