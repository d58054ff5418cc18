"""The PPO learner: advantages and clipped updates on the LoRA of a Stable Diffusion pipeline,
and `LoraLearner`, what it shares with the gradient learners (rl/gradient.py): the float32 LoRA,
the optimizer and LR schedule, fp16 loss scaling, the optimizer step across ranks, checkpoints.

Pure PyTorch. The Ray learner actor wraps this class; with torch.distributed initialised,
gradients are summed across ranks before every optimizer step. Each rank weights its loss by
its rows' share of the rows in the step, so every optimizer step follows the mean gradient over
the rows actually in it, however they split across ranks and accumulated minibatches, and L
learners on L shards take the same step as one learner on the union batch.

The text encoder runs forward and backward once per minibatch: its output embeddings are
the only path from the loss to its weights, so d(loss)/d(embeddings) is accumulated on
detached float32 leaves over the trained timesteps and then backpropagated through the encoder once.

Half precision: the frozen weights are in `model.dtype`, the LoRA weights, optimizer state,
log-probs, ratios and losses in float32. With float16 the loss is scaled (`LossScaler`) so the
gradients of the dimension-averaged log-prob do not underflow in the fp16 backward pass.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rl.config import ConfigError, TexForceConfig, TrainConfig
from rl.ddim import DDIMSchedule, ddim_sigma, ddim_step_gain
from rl.lora import (
    PolicyWeights,
    adapters_disabled,
    add_lora,
    get_policy_weights,
    set_policy_weights,
)
from rl.ppo import clipped_surrogate_loss, gaussian_kl
from rl.sampling import Trajectories, encode, recomputed_log_probs, step_distribution

log = logging.getLogger("texforce")


MISMATCH_PROBE_ROWS = 8
"""Rows of a stale batch whose log-probs the learner recomputes under the sampling LoRA (an
extra no-grad pass; on-policy batches are checked for free on the first minibatch)."""


def warmup_cosine(warmup_steps: int, total_steps: int, schedule: str):
    """LR multiplier: linear warmup from 0, then cosine decay to 0 (or constant)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
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


def learned_latent_positions(schedule: DDIMSchedule, eta: float, train: TrainConfig) -> torch.Tensor:
    """The chain positions of the latents a PPO update reads: x_t and x_{t-1} (positions j and j + 1,
    0 being x_T) of each step `trainable_steps` allows. All a sampler has to keep of a trajectory."""
    steps = trainable_steps(schedule, eta, train.min_sigma, max_step_gain=train.max_step_gain)
    return torch.cat([steps, steps + 1]).unique()


def warmup_length(train: TrainConfig, total_steps: int) -> int:
    """Warmup optimizer steps: `warmup_fraction` of the run when set (TexForce: 3%), else `warmup_steps`."""
    if train.warmup_fraction > 0:
        return int(train.warmup_fraction * total_steps)
    return train.warmup_steps


def optimizer_steps_per_epoch(config: TexForceConfig, world_size: int = 1) -> int:
    """A learner rank's optimizer steps per epoch (each rank takes the same): one per step of `accumulation_plan`,
    in each of PPO's `train.num_inner_epochs` passes (a gradient learner makes one)."""
    from rl.algorithms import get_algorithm

    train = config.train
    steps = len(accumulation_plan(config.samples_per_epoch, batch_size=train.batch_size,
                                  accumulate=train.gradient_accumulation_steps, world_size=world_size))
    return steps if get_algorithm(train.algorithm).learner == "gradient" else steps * train.num_inner_epochs


def accumulation_plan(
    num_samples: int, *, batch_size: int, accumulate: int, world_size: int = 1, rank: int = 0
) -> list[list[tuple[int, int, float]]]:
    """Per optimizer step, this rank's minibatches as (begin, end, weight) into the shuffled order.

    Global minibatch i covers positions [i*world*b, (i+1)*world*b), of which rank r takes the r-th
    b; every `accumulate` global minibatches (and the last, possibly short, group) make one
    optimizer step. weight = (rows of this minibatch) / (rows of the whole step over all ranks):
    a minibatch's mean loss times its weight, summed over minibatches and ranks, is the mean over
    the step's rows. A rank left without rows gets (p, p, 0.0).
    """
    span = batch_size * world_size
    starts = list(range(0, num_samples, span))
    plan = []
    for g in range(0, len(starts), accumulate):
        group = starts[g : g + accumulate]
        step_rows = sum(min(span, num_samples - start) for start in group)
        steps = []
        for start in group:
            begin = min(start + rank * batch_size, num_samples)
            end = min(start + (rank + 1) * batch_size, start + span, num_samples)
            steps.append((begin, end, (end - begin) / step_rows))
        plan.append(steps)
    return plan


# How an update's metrics combine over learner ranks (`combine_rank_metrics`). The same on every rank (the
# optimizer step's, after its all-reduce, and the version): rank 0's. The largest rank's: `logprob_mismatch` (a
# maximum over rows) and `trajectories_fetched` (a rank's load). Every other metric is a mean over the rows trained,
# over all ranks' rows.
RANK_INVARIANT_METRICS = frozenset({"grad_norm", "lr", "loss_scale", "skipped_steps", "policy_version", "staleness"})
RANK_MAX_METRICS = frozenset({"logprob_mismatch", "trajectories_fetched"})


class UpdateHistory:
    """One rank's metrics of an update as it runs: each minibatch's (means over its rows) with its row count,
    and each optimizer step's."""

    def __init__(self):
        self.minibatches: list[tuple[int, dict[str, float]]] = []
        self.steps: list[dict[str, float]] = []

    def minibatch(self, rows: int, metrics: dict[str, float]) -> None:
        self.minibatches.append((rows, metrics))

    def step(self, metrics: dict[str, float]) -> None:
        self.steps.append(metrics)

    def summary(self) -> dict[str, float]:
        """A minibatch metric's mean over the rows trained (NaN on a rank that trained none), an optimizer
        step's mean over the steps (`skipped_steps` their sum), and `rows_trained`, which
        `combine_rank_metrics` weighs this rank's means by."""
        summary = {}
        for key in dict.fromkeys(key for _, metrics in self.minibatches for key in metrics):
            weighted = [(rows, float(metrics[key])) for rows, metrics in self.minibatches if rows and key in metrics]
            total = sum(rows for rows, _ in weighted)
            summary[key] = sum(rows * value for rows, value in weighted) / total if total else math.nan
        for key in dict.fromkeys(key for metrics in self.steps for key in metrics):
            values = [metrics[key] for metrics in self.steps]
            summary[key] = float(np.sum(values) if key == "skipped_steps" else np.mean(values))
        summary["rows_trained"] = float(sum(rows for rows, _ in self.minibatches))
        return summary


def combine_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One update's metrics from every learner rank's (`UpdateHistory.summary`, in rank order): what L learners
    report is what one learner on the union batch would (a mean over all ranks' rows, not rank 0's share)."""
    combined = {}
    for key in dict.fromkeys(key for metrics in per_rank for key in metrics if key != "rows_trained"):
        having = [metrics for metrics in per_rank if key in metrics]
        trained = [metrics for metrics in having if metrics["rows_trained"] > 0]
        if key in RANK_INVARIANT_METRICS or not trained:
            combined[key] = having[0][key]
        elif key in RANK_MAX_METRICS:
            combined[key] = float(np.max([metrics[key] for metrics in trained]))
        else:
            total = sum(metrics["rows_trained"] for metrics in trained)
            combined[key] = sum(metrics["rows_trained"] * metrics[key] for metrics in trained) / total
    return combined


@dataclass
class UpdateDraws:
    """The random draws of one PPO update, made before its trajectories are fetched: per inner
    epoch the order of the samples and each sample's trainable steps in random order; this rank's
    `accumulation_plan`; the rows (sorted) its minibatches read, the only trajectories it needs (at
    least one); and the generator's state after the draws, which the update takes on."""

    orders: list[torch.Tensor]
    step_indices: list[torch.Tensor]
    plan: list[list[tuple[int, int, float]]]
    rows: torch.Tensor
    generator_state: torch.Tensor


class LossScaler:
    """Dynamic loss scaling for float16 backward passes; a no-op (scale 1) otherwise.

    The loss is multiplied by `scale` before backward, so the per-element gradients of the
    dimension-averaged log-prob stay in fp16's normal range, and the float32 gradients are divided
    by it before clipping. A step with inf/NaN gradients is skipped and the scale halved; after
    `growth_interval` finite steps in a row it doubles. bf16 has float32's range: no scaling.
    """

    def __init__(self, *, enabled: bool, init_scale: float, growth_interval: int):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.finite_steps = 0  # finite steps since the last change of scale

    def update(self, finite: bool) -> None:
        """Back off on a non-finite step; grow after `growth_interval` finite ones."""
        if not self.enabled:
            return
        if not finite:
            self.scale *= 0.5
            self.finite_steps = 0
            return
        self.finite_steps += 1
        if self.finite_steps >= self.growth_interval:
            self.scale *= 2.0
            self.finite_steps = 0

    def state_dict(self) -> dict[str, bool | float | int]:
        return {"enabled": self.enabled, "scale": self.scale, "finite_steps": self.finite_steps}

    def load_state_dict(self, state: dict[str, bool | float | int]) -> None:
        """Resume the scale; a state saved without scaling (not fp16) leaves the initial scale."""
        if self.enabled and state["enabled"]:
            self.scale, self.finite_steps = float(state["scale"]), int(state["finite_steps"])


def _world_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class LoraLearner:
    """What every learner shares: the trainable float32 LoRA, AdamW, the warmup + cosine LR
    schedule, fp16 loss scaling, the seeded generator for its random choices, the policy
    version, the optimizer step (gradients summed across ranks) and the checkpoint state.

    `optimizer_steps_per_epoch` sizes the LR schedule; subclasses add `update`.
    """

    def __init__(self, pipe, config: TexForceConfig, *, optimizer_steps_per_epoch: int):
        self.pipe = pipe
        self.config = config
        self.train = config.train
        self.sample = config.sample
        self.policy = config.lora.policy
        self.train_text_encoder = self.policy in ("text_encoder", "both")
        torch.manual_seed(config.seed if config.lora.init_seed is None else config.lora.init_seed)  # LoRA init
        self.params = add_lora(pipe, config.lora)
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=self.train.learning_rate,
            betas=(self.train.adam_beta1, self.train.adam_beta2),
            eps=self.train.adam_epsilon,
            weight_decay=self.train.weight_decay,
        )
        total_steps = optimizer_steps_per_epoch * config.num_epochs
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(warmup_length(self.train, total_steps), total_steps, self.train.lr_schedule)
        )
        self.scaler = LossScaler(
            enabled=pipe.unet.dtype == torch.float16,
            init_scale=self.train.init_loss_scale,
            growth_interval=self.train.loss_scale_growth_interval,
        )
        self.generator = torch.Generator().manual_seed(config.seed + 1)  # shuffles, timestep subsets
        self.version = 0

    def optimizer_step(self) -> dict[str, float]:
        """Sum gradients over ranks, unscale, clip, step, zero; returns grad_norm, lr, loss_scale, skipped_steps.

        The ranks' gradients are already weighted by their rows' share (`accumulation_plan`), so
        they are summed, not averaged. In fp16 they are summed while still scaled (an inf on
        any rank reaches all, so all ranks skip together), then unscaled in float32. A step with
        inf/NaN gradients is skipped in every dtype, LR schedule included (in fp16 the scale backs off).
        """
        world, _ = _world_and_rank()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if world > 1:
            for p in self.params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        scale = self.scaler.scale
        if scale != 1.0:
            for p in self.params:
                p.grad.div_(scale)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.train.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = not bool(torch.isfinite(grad_norm))  # one NaN would make every weight and Adam moment NaN
        if skipped and not self.scaler.enabled:  # fp16's loss scale overflows by design; elsewhere it is news
            log.warning("an optimizer step's gradients are not finite (grad_norm %s); skipped it, the LoRA unchanged "
                        "(`skipped_steps` counts them)", float(grad_norm))
        if not skipped:
            self.optimizer.step()
            self.lr_scheduler.step()
        self.scaler.update(finite=not skipped)
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "lr": lr, "loss_scale": scale, "skipped_steps": float(skipped)}

    def finish_update(self, history: "UpdateHistory") -> dict[str, float]:
        """Close one update: bump the policy version; this rank's metrics (`UpdateHistory.summary`)."""
        self.version += 1
        return history.summary() | {"loss_scale": self.scaler.scale, "policy_version": self.version}

    # --- weights and checkpoints -----------------------------------------------------------

    def get_weights(self) -> PolicyWeights:
        return get_policy_weights(self.pipe, self.policy, self.version)

    def state_dict(self) -> dict:
        """Everything needed to resume: LoRA, optimizer, LR schedule, loss scale, shuffling RNG, version."""
        return {
            "lora": {"text_encoder": (w := self.get_weights()).text_encoder, "unet": w.unet},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "loss_scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "version": self.version,
        }

    def load_state_dict(self, state: dict) -> None:
        """The checkpoint's LoRA, Adam moments, step count, loss scale and generator, under this learner's config:
        a resume's overrides of the optimizer's settings (`train.learning_rate`, `weight_decay`, Adam's betas and
        epsilon) and of the schedule's length (`num_epochs`) take effect from its first step (torch's
        `load_state_dict` would bring back the checkpoint's)."""
        lora = state["lora"]
        set_policy_weights(self.pipe, PolicyWeights(state["version"], lora["text_encoder"], lora["unet"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        t, step = self.train, self.lr_scheduler.last_epoch
        self.lr_scheduler.base_lrs = [t.learning_rate] * len(self.optimizer.param_groups)
        lr = t.learning_rate * self.lr_scheduler.lr_lambdas[0](step)  # the schedule at the restored step
        for group in self.optimizer.param_groups:
            group.update(lr=lr, initial_lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                         weight_decay=t.weight_decay)
        self.lr_scheduler._last_lr = [lr] * len(self.optimizer.param_groups)
        if "loss_scaler" in state:  # checkpoints from before fp16 loss scaling have none
            self.scaler.load_state_dict(state["loss_scaler"])
        self.generator.set_state(state["generator"])
        self.version = state["version"]


class PPOLearner(LoraLearner):
    """PPO on stored trajectories; takes batches with advantages.

    Advantages are computed by the caller (the driver holds the per-prompt statistics for the
    whole batch, so L learners see the same advantages as one).
    """

    def __init__(self, pipe, config: TexForceConfig, *, world_size: int = 1):
        super().__init__(pipe, config, optimizer_steps_per_epoch=optimizer_steps_per_epoch(config, world_size))
        self.schedule = DDIMSchedule.from_scheduler(pipe.scheduler, self.sample.num_steps)
        self.trainable_steps = trainable_steps(
            self.schedule, self.sample.eta, self.train.min_sigma, max_step_gain=self.train.max_step_gain
        )
        # the LoRA of the version before this one: with train.async_staleness=1 the samplers draw
        # an epoch with it while the learner trains on the epoch before
        self.previous_weights: PolicyWeights | None = None

    def get_weights(self, version: int | None = None) -> PolicyWeights:
        """This version's LoRA, or (version = current - 1) the one before it."""
        if version is None or version == self.version:
            return super().get_weights()
        if self.previous_weights is None or self.previous_weights.version != version:
            kept = [self.version] + ([self.previous_weights.version] if self.previous_weights else [])
            raise ValueError(f"the learner keeps the LoRA of versions {kept}, not {version}")
        return self.previous_weights

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.previous_weights is not None:
            w = self.previous_weights
            state["previous_lora"] = {"version": w.version, "text_encoder": w.text_encoder, "unet": w.unet}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        previous = state.get("previous_lora")  # absent in checkpoints from before async sampling
        self.previous_weights = (
            PolicyWeights(previous["version"], previous["text_encoder"], previous["unet"]) if previous else None
        )

    # --- the update ------------------------------------------------------------------------

    def draw_update(self, num_samples: int) -> UpdateDraws:
        """The random draws of the next update over `num_samples` samples, from a copy of the
        generator (it moves on only when `update` takes them): a rank draws them before it fetches
        the trajectories, to fetch only the rows it trains on."""
        generator = torch.Generator()
        generator.set_state(self.generator.get_state())
        steps = self.trainable_steps
        orders, step_indices = [], []
        for _ in range(self.train.num_inner_epochs):
            orders.append(torch.randperm(num_samples, generator=generator))
            step_indices.append(
                torch.stack([steps[torch.randperm(len(steps), generator=generator)] for _ in range(num_samples)])
            )
        world, rank = _world_and_rank()
        plan = accumulation_plan(
            num_samples, batch_size=self.train.batch_size, accumulate=self.train.gradient_accumulation_steps,
            world_size=world, rank=rank,
        )
        read = [order[begin:end] for order in orders for step in plan for begin, end, _ in step]
        rows = torch.cat(read).unique() if read else torch.empty(0, dtype=torch.long)
        if len(rows) == 0:  # a rank left without rows still reads one, for the batch's shapes
            rows = torch.zeros(1, dtype=torch.long)
        return UpdateDraws(orders, step_indices, plan, rows, generator.get_state())

    def update(
        self, trajectories: Trajectories, advantages: torch.Tensor, draws: UpdateDraws | None = None
    ) -> dict[str, float]:
        """`num_inner_epochs` passes of minibatch PPO over this batch; returns mean metrics.

        Every rank draws the same shuffle over the whole batch (`draw_update`); `accumulation_plan`
        says which rows of each optimizer step this rank trains and with what weight, so the summed
        gradient is the mean gradient over the step's rows. `trajectories` holds every row of the
        batch (`advantages` has one per row), or only `draws.rows`, in that order: what a rank fetched.
        `skipped_steps` counts steps skipped for inf/NaN gradients, `loss_scale` is the scale
        after this update. `staleness` is how many versions behind the learner the sampling LoRA was
        (train.async_staleness); the stored log-probs are the old policy's either way, so the PPO
        ratio stays correct. `logprob_mismatch` compares them with the learner's recomputation under
        the sampling LoRA, before any step.
        """
        num_samples, num_steps = len(advantages), trajectories.log_probs.shape[1]
        if num_steps != self.schedule.num_steps:
            raise ValueError(f"trajectories have {num_steps} steps, the learner's schedule {self.schedule.num_steps}")
        draws = draws or self.draw_update(num_samples)
        position = torch.arange(num_samples)  # of a batch row in `trajectories`
        if len(trajectories) != num_samples:
            if len(trajectories) != len(draws.rows):
                raise ValueError(f"{len(trajectories)} trajectories for a batch of {num_samples} of which this rank "
                                 f"trains {len(draws.rows)}: pass all of them or exactly those")
            position[draws.rows] = torch.arange(len(draws.rows))
        self.generator.set_state(draws.generator_state)
        num_trained = max(1, int(len(self.trainable_steps) * self.train.timestep_fraction))
        staleness = self.version - trajectories.policy_version
        this_version = super().get_weights()
        history = UpdateHistory()
        first = True
        # 1. per inner epoch: the samples in shuffled order, each with its trained steps drawn at random
        for order, step_index in zip(draws.orders, draws.step_indices):
            for minibatches in draws.plan:
                # 2. accumulate the row-weighted gradients of this rank's minibatches of the step
                for begin, end, weight in minibatches:
                    if end == begin:  # an uneven last minibatch can leave a rank without rows
                        continue
                    rows = order[begin:end]
                    if first and staleness:  # before any step, under the LoRA that sampled; a few rows suffice
                        probe = rows[:MISMATCH_PROBE_ROWS]
                        mismatch = self.logprob_mismatch(trajectories.select(position[probe]),
                                                         step_index[probe, :num_trained],
                                                         trajectories.policy_version, current=this_version)
                    metrics = self.minibatch_backward(
                        trajectories.select(position[rows]), advantages[rows], step_index[rows, :num_trained], weight
                    )
                    if first:  # before any optimizer step: the learner must agree with the sampler
                        metrics["logprob_mismatch"] = mismatch if staleness else metrics.pop("abs_logprob_diff")
                        first = False
                    metrics.pop("abs_logprob_diff", None)
                    history.minibatch(end - begin, metrics)
                # 3. one optimizer step over them
                history.step(self.optimizer_step())
        self.previous_weights = this_version
        return self.finish_update(history) | {"staleness": float(staleness)}

    @torch.no_grad()
    def logprob_mismatch(self, batch: Trajectories, step_index: torch.Tensor, version: int, *,
                         current: PolicyWeights) -> float:
        """Max over rows of |recomputed - stored log-prob| under the LoRA of `version`, averaged
        over the trained steps (NaN when the learner no longer keeps that version): the check
        that learner and samplers compute the same policy, for a batch sampled by an older one.
        `current` (the learner's LoRA now) is put back afterwards."""
        try:
            sampling = self.get_weights(version)
        except ValueError:
            return float("nan")
        set_policy_weights(self.pipe, sampling)
        try:
            cond = encode(self.pipe.text_encoder, batch.prompt_ids).float()
            uncond = encode(self.pipe.text_encoder, batch.negative_ids).float()
            recomputed = recomputed_log_probs(self.pipe.unet, self.schedule, batch, step_index, cond, uncond,
                                              guidance_scale=self.sample.guidance_scale, eta=self.sample.eta)
        finally:
            set_policy_weights(self.pipe, current)
        stored = batch.log_probs.gather(1, step_index).to(recomputed.device)
        return (recomputed - stored).abs().amax(dim=0).mean().item()

    def minibatch_backward(
        self, batch: Trajectories, advantages: torch.Tensor, step_index: torch.Tensor, weight: float = 1.0
    ) -> dict[str, float]:
        """Accumulate d(loss)/d(LoRA) for one minibatch into `.grad`, times the loss scale (fp16).

        step_index: [b, K] which stored steps of each trajectory to train on. The loss is the
        PPO surrogate, plus kl_coef times the KL to the base model's step, averaged over the K
        steps and the b rows, times `weight` (the minibatch's share of its optimizer step's rows).
        """
        device = self.pipe.unet.device
        use_kl = self.train.kl_coef > 0
        # 1. encode prompt and negative prompt once, then cut the graph at the embeddings
        with torch.set_grad_enabled(self.train_text_encoder):
            cond = encode(self.pipe.text_encoder, batch.prompt_ids)
            uncond = encode(self.pipe.text_encoder, batch.negative_ids)
        # float32 leaves: the K steps' embedding gradients accumulate in float32
        cond_leaf = cond.detach().float().requires_grad_(self.train_text_encoder)
        uncond_leaf = uncond.detach().float().requires_grad_(self.train_text_encoder)
        if use_kl and self.train_text_encoder:  # the base model's embeddings
            with torch.no_grad(), adapters_disabled(self.pipe, self.policy):
                ref_cond = encode(self.pipe.text_encoder, batch.prompt_ids)
                ref_uncond = encode(self.pipe.text_encoder, batch.negative_ids)
        else:  # a frozen text encoder: the policy's embeddings are the base model's
            ref_cond, ref_uncond = cond, uncond
        # 2. per trained step: recompute log-prob, PPO loss (+ KL), backward to the leaves (and U-Net LoRA).
        # The trained steps' tensors move to the device in one copy each, and the metrics stay there
        # until the end: no host<->device copy or sync inside the loop, so the host queues the next step's
        # kernels while a GPU runs this one.
        x_ts, ts, x_prevs = batch.steps_at(step_index, device)  # [b, K, ...]
        old_log_probs = batch.log_probs.gather(1, step_index).to(device)
        advantages = advantages.to(device)
        num_trained = step_index.shape[1]
        guidance, eta = self.sample.guidance_scale, self.sample.eta
        totals: dict[str, torch.Tensor] = {}
        for k in range(num_trained):
            x_t, t, x_prev, old_log_prob = x_ts[:, k], ts[:, k], x_prevs[:, k], old_log_probs[:, k]
            log_prob, mean, sigma = step_distribution(
                self.pipe.unet, self.schedule, x_t, t, x_prev, cond_leaf, uncond_leaf, guidance_scale=guidance, eta=eta
            )
            loss, metrics = clipped_surrogate_loss(log_prob, old_log_prob, advantages, self.train.clip_range)
            metrics["abs_logprob_diff"] = (log_prob - old_log_prob).abs().max()
            if use_kl:  # closed-form KL of this step to the base model's, at the same x_t
                with torch.no_grad(), adapters_disabled(self.pipe, self.policy):
                    _, ref_mean, _ = step_distribution(
                        self.pipe.unet, self.schedule, x_t, t, x_prev, ref_cond, ref_uncond, guidance_scale=guidance, eta=eta
                    )
                kl = gaussian_kl(mean, ref_mean, sigma).mean()
                loss = loss + self.train.kl_coef * kl
                metrics["kl_to_base"] = kl.detach()
            (loss * (weight * self.scaler.scale / num_trained)).backward()
            for key, value in {"loss": loss.detach(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value.double() / num_trained
        means = dict(zip(totals, torch.stack(list(totals.values())).tolist()))  # the one sync of the minibatch
        # 3. one backward through the text encoder with the accumulated embedding gradients
        if self.train_text_encoder:
            torch.autograd.backward([cond, uncond], [cond_leaf.grad.to(cond.dtype), uncond_leaf.grad.to(uncond.dtype)])
        return means
