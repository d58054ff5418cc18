"""Typed run configuration: dataclasses with the published TexForce defaults.

A config is a tree of dataclasses. It is built from YAML and `section.key=value` overrides;
an unknown key or a value of the wrong type is an error that names the key and the closest
valid one. Derived values are computed in one place (`TexForceConfig.validate`).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad setting: a key or value in a config file or an override, or a command-line option.

    A user error: the command line prints it as one line and exits with code 2 (rl/cli.py).
    """


@dataclass
class ModelConfig:
    pretrained: str = "runs/tiny-sd"
    """Local diffusers directory (or a hub id where a hub is reachable) of a Stable Diffusion pipeline."""
    revision: str | None = None
    """Hub revision; ignored for local directories."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen weights; the LoRA and the log-prob math stay in float32."""
    device: str = "auto"
    """`auto` picks cuda when available, else cpu."""


SEED_LIMIT = 2**63
"""Seeds are int64 (torch's generators and the stored `seeds`): one above the largest."""

BFLOAT16_MIN_CLIP_RANGE = 1e-2
"""The smallest train.clip_range PPO takes with bfloat16 frozen weights: above the log-ratio's rounding after one step
(bench/ppo_ratio_precision.py on the toy model: 1e-4 to 2e-3 a step, as large as the published 1e-4; at 1e-2 bf16 clips
the terms float32 clips in every setting measured; docs/half_precision.md)."""


@dataclass
class LoraSettings:
    policy: Literal["text_encoder", "unet", "both"] = "text_encoder"
    """What the LoRA adapts: the text encoder (TexForce), the U-Net (DDPO), or both."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; deltaW = (alpha / r) * B @ A."""
    init: Literal["gaussian", "default", "zeros"] = "gaussian"
    """peft `init_lora_weights`: B starts at zero either way, so the policy starts at the base model."""
    init_seed: int | None = None
    """Seed of the LoRA's random A matrices; None: the run's `seed`. Set it to vary the subspace the LoRA
    starts in apart from the prompt order and noise, which `seed` keeps (docs/demo.md, "What separates
    the seeds")."""
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Text-encoder modules that get a LoRA."""
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """U-Net modules that get a LoRA when `policy` is `unet` or `both`."""


@dataclass
class SampleConfig:
    num_steps: int = 50
    """DDIM steps T per trajectory."""
    eta: float = 1.0
    """DDIM eta; > 0 makes each step a Gaussian policy."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight w."""
    negative_prompt: str = ""
    """Prompt encoded (by the same LoRA'd encoder) for the unconditional branch."""
    batch_size: int = 4
    """Trajectories per sampling call (per sampler)."""
    num_batches_per_epoch: int = 64
    """Sampling calls per epoch; samples per epoch = batch_size * num_batches_per_epoch."""
    height: int | None = None
    """Image height; None uses the U-Net's native sample size."""
    width: int | None = None
    """Image width; None uses the U-Net's native sample size."""
    shared_start_noise: bool = False
    """The samples of a prompt group (advantage.mode=group) start from one x_T, each with its own step noise
    (DanceGRPO's shared initial noise): the group's rewards then differ by what the policy's steps do, not
    by where they started, and the group mean removes the start's share of the reward's spread."""


@dataclass
class TrainConfig:
    algorithm: str = "ppo"
    """ppo (TexForce/DDPO), or a gradient learner: draft, draft_k, draft_lv, refl, alignprop, textcraftor
    (rl/algorithms.py; their settings are in `gradient`)."""
    learning_rate: float = 3e-4
    """AdamW learning rate (peak, after warmup)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup from LR 0 before the cosine decay."""
    warmup_fraction: float = 0.0
    """Warmup as a fraction of the run's optimizer steps (TexForce's code: 0.03); when > 0 it replaces warmup_steps."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """LR schedule after warmup."""
    batch_size: int = 4
    """Trajectories per minibatch (per learner)."""
    gradient_accumulation_steps: int = 1
    """Minibatches accumulated per optimizer step."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    clip_range: float = 1e-4
    """PPO ratio clip epsilon."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    timestep_fraction: float = 0.5
    """Fraction of each trajectory's trainable steps trained on (a random subset per sample)."""
    min_sigma: float = 0.0
    """Steps whose DDIM noise std sigma_t is below this are never trained (0 = train all, as the
    papers do). sigma_t falls along the trajectory, so this keeps an early window: the demo's 0.55
    trains the first 4 of 10 steps (bench/gradient_snr.py measures the signal per window)."""
    max_step_gain: float = 0.0
    """Steps whose gain |d mean / d eps_hat| / sigma_t exceeds this are never trained (0 = off); 2 drops
    the step onto t=1 of SD's schedule, whose SNR jump makes its log-prob gradient mostly noise."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    init_loss_scale: float = 65536.0
    """float16 only: initial dynamic loss scale (2^16, as torch's GradScaler); halved on inf/NaN gradients."""
    loss_scale_growth_interval: int = 2000
    """float16 only: optimizer steps with finite gradients after which the loss scale doubles."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to the base model's step distribution, per trained step (0 = off,
    as in TexForce). Costs one extra U-Net pass per trained step with the LoRA disabled."""
    async_staleness: int = 0
    """PPO only. 0: sample an epoch, then train on it (on-policy, as the papers). 1: the samplers
    draw epoch e+1 with the LoRA the learner starts epoch e from, while it trains on epoch e (one
    version stale; the stored old log-probs keep the PPO ratio correct); on Ray sampling and
    learning then overlap (on 2 cores 1.04-1.05x the samples/s of a synchronous learner that uses
    both cores while it updates; docs/performance.md); on the demo's 5 seeds its held-out gain
    was not distinguishable from the synchronous loop's (docs/demo.md). Inline mode computes the
    same run as Ray for either value."""


@dataclass
class GradientConfig:
    """The gradient learners' settings (DRaFT paper, ReFL, AlignProp, TextCraftor). They sample with
    DDIM at eta 0 (sample.eta is PPO's) and sample.guidance_scale, and use train.* for the optimizer."""

    truncation_k: int = 1
    """DRaFT-K: the gradient flows through the last K sampling steps (K=1 is DRaFT's best)."""
    textcraftor_fraction: float = 0.2
    """TextCraftor: the fine-tuned encoder drives (and the gradient flows through) the last
    K = max(1, round(fraction x sample.num_steps)) steps, the base encoder the rest. The official
    code backpropagates through the last 5 of its 25 DDIM steps (`grad_steps=5`, train_textcraftor.py)."""
    lv_copies: int = 2
    """DRaFT-LV: copies n of the final sample (drawn without grad), each re-noised to the last timestep
    and denoised in one step with grad; their rewards are summed."""
    refl_min_fraction: float = 0.75
    """ReFL: earliest stop step as a fraction of sample.num_steps (ReFL's code: step 30 of 40)."""
    refl_max_fraction: float = 0.975
    """ReFL: latest stop step as a fraction of sample.num_steps (step 39 of 40); the stop step is
    uniform in [floor(min * T), floor(max * T)], capped at T - 1."""
    alignprop_max_k: int | None = None
    """AlignProp: K is drawn uniformly from [1, alignprop_max_k] per minibatch; null = sample.num_steps."""
    kl_coef: float = 0.0
    """DPOK's KL regulariser: adds kl_coef x the mean squared difference between the fine-tuned and the
    base model's guided noise predictions, at one step with grad per minibatch (0 = off). What the reward
    does not name is held to the base model; logged as `kl_to_base`. PPO's is train.kl_coef."""
    clip_score_weight: float = 0.0
    """TextCraftor's regulariser: weight of a `clip_score` term added to the reward (0 = off; needs
    reward.paths.clip_score)."""
    checkpointing: bool = True
    """Recompute each U-Net call and the VAE decode in the backward pass instead of storing their
    activations: memory grows with K by the stored latents only (bench/gradient_memory.py)."""


@dataclass
class AdvantageConfig:
    mode: Literal["per_prompt", "group", "batch"] = "per_prompt"
    """per_prompt: running per-prompt mean/std (DDPO); group: GRPO-style within k samples of a prompt; batch: whole-batch stats."""
    buffer_size: int = 16
    """Per-prompt history length."""
    min_count: int = 16
    """Below this many rewards for a prompt, use the batch statistics."""
    group_size: int = 4
    """k samples of each prompt in a batch when mode is `group`."""


@dataclass
class PromptConfig:
    file: str | None = None
    """Text file with one prompt per line; None uses `builtin`."""
    builtin: Literal["colors", "animals"] = "colors"
    """Embedded prompt set used when no file is given."""
    order: Literal["random", "cycle"] = "random"
    """random: each epoch draws its prompts independently, with replacement (DDPO's sampling);
    cycle: epochs walk through shuffled passes over the list, so every prompt is trained as often as
    any other. The per-sample noise seeds are the same under both."""


@dataclass
class EvaluationConfig:
    prompts_file: str | None = None
    """Held-out prompts (one per line) scored before training and after the last epoch; None: no evaluation."""
    num_seeds: int = 4
    """Images per held-out prompt; image j of every prompt has the fixed seed `seed_base + j`, the same at every evaluation."""
    seed_base: int = 2**31
    """First evaluation seed; above the training seeds' range [0, 2^31)."""
    every: int = 0
    """Also evaluate after every N-th epoch; 0: only before training and after the last epoch."""
    reward: str | None = None
    """Reward spec the held-out prompts are scored with; None: reward.spec. A run can train on a
    shaped reward (object_alignment_soft) and be judged on the one it targets (object_alignment)."""
    eta: float | None = None
    """DDIM eta of the held-out images; None: sample.eta (the policy's own). 0 is the deterministic
    sampler users generate with; steps and guidance are always the sample's."""


@dataclass
class RewardSettings:
    spec: str = "color_alignment"
    """Reward name or weighted sum, e.g. `imagereward:1.0,aesthetic:0.5`."""
    paths: dict[str, str] = field(default_factory=dict)
    """Reward model files, by the reward's path key."""
    on_non_finite: Literal["drop", "stop"] = "drop"
    """A non-finite reward drops its sample with a warning, or stops the run after a checkpoint."""


@dataclass
class ResourcesConfig:
    mode: Literal["ray", "inline"] = "ray"
    """ray: actors on a Ray cluster; inline: the same classes in this process (debugger-friendly)."""
    address: str | None = None
    """Ray address to join; None joins RAY_ADDRESS if set, else starts a local single-node cluster."""
    num_samplers: int = 2
    """Sampler workers rolling out trajectories."""
    gpus_per_sampler: float = 0.0
    """GPUs per sampler (fractions share a GPU)."""
    cpus_per_sampler: float = 1.0
    """CPUs per sampler; also its torch thread count."""
    num_reward_actors: int = 1
    """Reward actors scoring images."""
    gpus_per_reward_actor: float = 0.0
    """GPUs per reward actor."""
    cpus_per_reward_actor: float = 1.0
    """CPUs per reward actor."""
    num_learners: int = 1
    """Data-parallel learners (gradients all-reduced with gloo on CPU, nccl on GPU); train.batch_size is per learner.
    Inline (resources.mode=inline) one learner takes their steps on their minibatches, N x train.batch_size rows."""
    gpus_per_learner: float = 0.0
    """GPUs per learner."""
    cpus_per_learner: float = 1.0
    """CPUs per learner."""
    learner_threads: int = 0
    """Torch intra-op threads of each Ray learner; 0: floor(cpus_per_learner), at least 1. On one
    node with synchronous sampling the rollout roles idle while the learner trains, so a learner
    that reserves 0.75 CPU may still use both cores then (the demo: docs/performance.md)."""
    rollout_low_priority: bool = True
    """Ray samplers and reward actors run at the lowest CPU priority (Linux SCHED_IDLE, else nice
    19). Where they share cores with a learner (one node, async sampling), the learner's update,
    which every epoch waits for, keeps its core and the next epoch's rollout gets what is left
    (measured: docs/performance.md); on cores of their own they run at full speed either way.
    They lower it once loaded, so a (re)start is not starved; but on a node whose cores other jobs
    keep busy they get almost no CPU (a GPU node's kernel-launching thread too): set false there."""
    call_timeout_s: float = 1800.0
    """Longest wait for one remote call before the run fails."""
    max_restarts: int = 3
    """Restarts of a sampler or reward actor that dies; its work is re-issued."""
    resource_wait_s: float = 0.0
    """How long to wait for an autoscaling cluster to grow to the requested resources."""


@dataclass
class TexForceConfig:
    run_name: str = "texforce"
    """Name of the run; the run directory is output_dir/run_name."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 42
    """Seed for prompts, noise and LoRA init."""
    num_epochs: int = 50
    """Sample/update rounds."""
    save_every: int = 1
    """Checkpoint every N epochs."""
    keep_checkpoints: int | None = None
    """Keep the newest N checkpoints, deleting older ones after each save (null: keep every one; DDPO's code keeps
    5). Resume and learner recovery fall back to an older one when the newest cannot be read: keep 2 or more."""
    plot_every: int | Literal["auto"] = "auto"
    """Write the epoch's image grid and redraw the reward curve every N epochs (and after the last, or when a run
    stops); metrics.parquet and TensorBoard get every epoch. `auto`: the first epoch, the last, and between them
    as often as keeps drawing within 1% of the run's time (every epoch where epochs take a few seconds; a drawing
    costs ~0.1 s of CPU; docs/performance.md)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gradient: GradientConfig = field(default_factory=GradientConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardSettings = field(default_factory=RewardSettings)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def validate(self) -> "TexForceConfig":
        """Check every value and the cross-field constraints; raise ConfigError naming the key and the fix.

        What needs the model (image size vs the VAE, `train.min_sigma` vs the schedule), the
        prompts or the reward files is checked by `rl.preflight.preflight`.
        """
        s, t, r, a = self.sample, self.train, self.resources, self.advantage
        positive_int = "an integer >= 1"
        checks = [
            # (holds, key, value, what it must be, why / how to fix ("" if obvious))
            (_is_folder_name(self.run_name), "run_name", self.run_name,
             "a folder name without '/' or '\\' (not '', '.' or '..')", "the run directory is output_dir/run_name"),
            (self.num_epochs >= 1, "num_epochs", self.num_epochs, positive_int, ""),
            (0 <= self.seed < SEED_LIMIT, "seed", self.seed, "in [0, 2**63)", "torch's generators take int64 seeds"),
            (self.lora.init_seed is None or 0 <= self.lora.init_seed < SEED_LIMIT, "lora.init_seed",
             self.lora.init_seed, "in [0, 2**63) or null (from seed)", ""),
            (0 <= self.evaluation.seed_base <= SEED_LIMIT - self.evaluation.num_seeds, "evaluation.seed_base",
             self.evaluation.seed_base, "in [0, 2**63 - evaluation.num_seeds]", "image j's seed is seed_base + j"),
            (self.save_every >= 1, "save_every", self.save_every, positive_int, "checkpoint every N epochs"),
            (self.keep_checkpoints is None or self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints,
             f"{positive_int} or null (keep every checkpoint)", ""),
            (self.plot_every == "auto" or self.plot_every >= 1, "plot_every", self.plot_every, f"{positive_int} or auto",
             "image grid and reward curve every N epochs"),
            (s.num_steps >= 1, "sample.num_steps", s.num_steps, positive_int, ""),
            (0 < s.eta <= 1, "sample.eta", s.eta, "in (0, 1]",
             "eta=0 is deterministic and has no log-prob; above 1 the DDIM step's variance goes negative"),
            (s.guidance_scale >= 0, "sample.guidance_scale", s.guidance_scale, ">= 0",
             "1 = the conditional prediction alone; the published setting is 5"),
            (s.batch_size >= 1, "sample.batch_size", s.batch_size, positive_int, ""),
            (s.num_batches_per_epoch >= 1, "sample.num_batches_per_epoch", s.num_batches_per_epoch, positive_int, ""),
            (s.height is None or s.height >= 1, "sample.height", s.height, ">= 1, or null for the U-Net's size", ""),
            (s.width is None or s.width >= 1, "sample.width", s.width, ">= 1, or null for the U-Net's size", ""),
            (t.learning_rate > 0, "train.learning_rate", t.learning_rate, "> 0", "the published setting is 3e-4"),
            (0 <= t.adam_beta1 < 1, "train.adam_beta1", t.adam_beta1, "in [0, 1)", ""),
            (0 <= t.adam_beta2 < 1, "train.adam_beta2", t.adam_beta2, "in [0, 1)", ""),
            (t.adam_epsilon > 0, "train.adam_epsilon", t.adam_epsilon, "> 0", ""),
            (t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0", ""),
            (t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0", ""),
            (0 <= t.warmup_fraction < 1, "train.warmup_fraction", t.warmup_fraction, "in [0, 1)",
             "TexForce warms up over 3% of the steps"),
            (t.init_loss_scale > 0, "train.init_loss_scale", t.init_loss_scale, "> 0", "fp16 starts at 65536"),
            (t.loss_scale_growth_interval >= 1, "train.loss_scale_growth_interval", t.loss_scale_growth_interval,
             positive_int, ""),
            (t.batch_size >= 1, "train.batch_size", t.batch_size, positive_int, ""),
            (t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", t.gradient_accumulation_steps,
             positive_int, "1 = an optimizer step per minibatch"),
            (t.num_inner_epochs >= 1, "train.num_inner_epochs", t.num_inner_epochs, positive_int,
             "passes over each epoch's samples"),
            (t.clip_range > 0, "train.clip_range", t.clip_range, "> 0", ""),
            (t.adv_clip_max > 0, "train.adv_clip_max", t.adv_clip_max, "> 0", ""),
            (0 < t.timestep_fraction <= 1, "train.timestep_fraction", t.timestep_fraction, "in (0, 1]", ""),
            (t.min_sigma >= 0, "train.min_sigma", t.min_sigma, ">= 0", ""),
            (t.max_step_gain >= 0, "train.max_step_gain", t.max_step_gain, ">= 0", "0 = off"),
            (t.max_grad_norm > 0, "train.max_grad_norm", t.max_grad_norm, "> 0", ""),
            (t.kl_coef >= 0, "train.kl_coef", t.kl_coef, ">= 0", ""),
            (t.async_staleness in (0, 1), "train.async_staleness", t.async_staleness, "0 or 1",
             "0 = sample then train on-policy, 1 = sample the next epoch while training this one"),
            (self.lora.rank >= 1, "lora.rank", self.lora.rank, positive_int, ""),
            (self.lora.alpha > 0, "lora.alpha", self.lora.alpha, "> 0", ""),
            (a.buffer_size >= 1, "advantage.buffer_size", a.buffer_size, positive_int, ""),
            (a.min_count >= 0, "advantage.min_count", a.min_count, ">= 0", ""),
            (a.mode != "per_prompt" or a.min_count <= a.buffer_size, "advantage.min_count", a.min_count,
             f"<= advantage.buffer_size={a.buffer_size} in per_prompt mode",
             "a prompt's history holds buffer_size rewards at most: a larger min_count means batch statistics "
             "for ever"),
            (a.group_size >= 2, "advantage.group_size", a.group_size, "an integer >= 2", ""),
            (r.num_samplers >= 1, "resources.num_samplers", r.num_samplers, positive_int, ""),
            (r.num_reward_actors >= 1, "resources.num_reward_actors", r.num_reward_actors, positive_int, ""),
            (r.num_learners >= 1, "resources.num_learners", r.num_learners, positive_int, ""),
            *[
                (getattr(r, key) >= 0, f"resources.{key}", getattr(r, key), ">= 0", "")
                for key in ("cpus_per_sampler", "gpus_per_sampler", "cpus_per_reward_actor", "gpus_per_reward_actor",
                            "cpus_per_learner", "gpus_per_learner", "learner_threads", "max_restarts", "resource_wait_s")
            ],
            (self.evaluation.num_seeds >= 1, "evaluation.num_seeds", self.evaluation.num_seeds, positive_int, ""),
            (self.evaluation.every >= 0, "evaluation.every", self.evaluation.every, ">= 0",
             "0 = before training and after the last epoch only"),
            (self.evaluation.eta is None or 0 <= self.evaluation.eta <= 1, "evaluation.eta", self.evaluation.eta,
             "in [0, 1], or null for sample.eta", "0 = deterministic DDIM"),
            (r.call_timeout_s > 0, "resources.call_timeout_s", r.call_timeout_s, "> 0", ""),
        ]
        for ok, key, value, rule, why in checks:
            if not ok:
                raise ConfigError(f"{key} must be {rule}, got {value!r}" + (f" ({why})" if why else ""))
        self._validate_algorithm()
        if a.mode == "group" and self.samples_per_epoch % a.group_size:
            raise ConfigError(
                f"samples per epoch (sample.batch_size * sample.num_batches_per_epoch = {self.samples_per_epoch}) "
                f"must be a multiple of advantage.group_size={a.group_size} in group mode"
            )
        return self

    def _validate_algorithm(self) -> None:
        """train.algorithm is registered; shared start noise has PPO's groups; a gradient learner's settings fit
        sample.num_steps and lora.policy."""
        from rl.algorithms import UnknownAlgorithmError, get_algorithm

        try:
            algorithm = get_algorithm(self.train.algorithm)
        except UnknownAlgorithmError as error:
            raise ConfigError(f"train.algorithm: {error}") from None
        if self.sample.shared_start_noise and (self.advantage.mode != "group" or algorithm.learner == "gradient"):
            raise ConfigError(
                "sample.shared_start_noise=true needs PPO's prompt groups (advantage.mode=group and train.algorithm=ppo), "
                f"got advantage.mode={self.advantage.mode!r}, train.algorithm={self.train.algorithm!r}"
            )
        if (algorithm.learner == "ppo" and self.model.dtype == "bfloat16"
                and self.train.clip_range < BFLOAT16_MIN_CLIP_RANGE):
            raise ConfigError(
                f"train.clip_range={self.train.clip_range:g} is below bfloat16's rounding of PPO's log-ratio (1e-4 to "
                f"2e-3 a step once the LoRA has moved), so clipping would follow rounding: use model.dtype=float16 "
                f"(loss-scaled, as configs/sd15.yaml) or float32, or train.clip_range >= {BFLOAT16_MIN_CLIP_RANGE:g}"
            )
        if algorithm.learner != "gradient":
            return
        g, steps = self.gradient, self.sample.num_steps
        checks = [
            (1 <= g.truncation_k <= steps, "gradient.truncation_k", g.truncation_k,
             f"in [1, sample.num_steps={steps}]", "the gradient flows through the last K of the sampling steps"),
            (0 < g.textcraftor_fraction <= 1, "gradient.textcraftor_fraction", g.textcraftor_fraction, "in (0, 1]",
             "TextCraftor's code: the last 5 of 25 steps, 0.2"),
            (g.lv_copies >= 1, "gradient.lv_copies", g.lv_copies, "an integer >= 1", "DRaFT-LV uses 2"),
            (0 <= g.refl_min_fraction <= g.refl_max_fraction < 1, "gradient.refl_min_fraction/refl_max_fraction",
             (g.refl_min_fraction, g.refl_max_fraction), "0 <= min <= max < 1", "ReFL stops at step 30-39 of 40"),
            (g.alignprop_max_k is None or 1 <= g.alignprop_max_k <= steps, "gradient.alignprop_max_k",
             g.alignprop_max_k, f"in [1, sample.num_steps={steps}] or null", ""),
            (g.clip_score_weight >= 0, "gradient.clip_score_weight", g.clip_score_weight, ">= 0", "0 = off"),
            (g.kl_coef >= 0, "gradient.kl_coef", g.kl_coef, ">= 0", "0 = off"),
            (not algorithm.original_encoder_early or self.lora.policy in ("text_encoder", "both"), "lora.policy",
             self.lora.policy, "text_encoder or both with train.algorithm=textcraftor",
             "TextCraftor fine-tunes the text encoder"),
        ]
        for ok, key, value, rule, why in checks:
            if not ok:
                raise ConfigError(f"{key} must be {rule}, got {value!r}" + (f" ({why})" if why else ""))

    @property
    def samples_per_epoch(self) -> int:
        return self.sample.batch_size * self.sample.num_batches_per_epoch

    @property
    def evaluation_eta(self) -> float:
        """The DDIM eta of held-out evaluation images: evaluation.eta, else the policy's sample.eta."""
        return self.sample.eta if self.evaluation.eta is None else self.evaluation.eta


def _is_folder_name(name: str) -> bool:
    return bool(name.strip()) and name not in (".", "..") and not any(sep in name for sep in ("/", "\\"))


# --- building configs from dicts, YAML and overrides ---------------------------------------


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(options)}"


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as error:
                errors.append(str(error))
        if len(errors) > 1:
            expected = " or ".join(" or ".join(map(repr, typing.get_args(a))) if typing.get_origin(a) is Literal
                                   else getattr(a, "__name__", str(a)) for a in args if a is not type(None))
            raise ConfigError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _check_type(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if annotation is float:
        if isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a float, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'{_closest(name, list(fields))}")
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = from_dict(annotation, value, prefix=f"{key}.")
        else:
            kwargs[name] = _check_type(value, annotation, key)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b=value` entries in a nested dict; values are parsed as YAML scalars."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        annotation = _check_override_key(parts, item)
        node = data
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part) or {}, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(f"override '{item}': {prefix} is {node[part]!r}, not a section; write {prefix}=VALUE")
            node[part] = dict(node.get(part) or {})
            node = node[part]
        try:
            node[parts[-1]] = _override_value(raw, annotation)
        except yaml.YAMLError as error:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(error)})") from None
    return data


def _check_override_key(parts: list[str], item: str) -> Any:
    """Reject `num_epochs.x=1` (a value used as a section) and empty key parts; returns the type of the value
    the key sets (None for an unknown key: `from_dict` rejects it, suggesting the closest valid one)."""
    if not all(parts):
        raise ConfigError(f"override '{item}' has an empty key part; write section.key=value")
    cls: Any = TexForceConfig
    for depth, part in enumerate(parts[:-1]):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        annotation = hints[part]
        if dataclasses.is_dataclass(annotation):
            cls = annotation
            continue
        if typing.get_origin(annotation) is dict and depth == len(parts) - 2:
            return typing.get_args(annotation)[1]  # reward.paths.<key>=...
        prefix = ".".join(parts[: depth + 1])
        raise ConfigError(f"override '{item}': {prefix} is a value, not a section; write {prefix}=VALUE")
    return typing.get_type_hints(cls).get(parts[-1])


def _override_value(raw: str, annotation: Any) -> Any:
    """An override's value: YAML, except for a text setting (a prompt, a path), which is taken as written unless it
    is quoted or null: YAML would cut `blurry, #lowres` at its comment and read `a: b` as a mapping."""
    text = raw.strip()
    if not text:
        return ""
    is_text = annotation is str or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                    and set(typing.get_args(annotation)) == {str, type(None)})
    if is_text and text not in ("null", "Null", "NULL", "~") and text[0] not in "'\"":
        return text
    return yaml.safe_load(text)


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at column {mark.column + 1}" if mark is not None else problem


def utf8_problem(raw: bytes) -> str | None:
    """None when `raw` decodes as UTF-8, else where it does not ("line 3: byte 0xe9 is not UTF-8")."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        return f"line {line}: byte 0x{raw[error.start]:02x} is not UTF-8"
    return None


def read_yaml(path: Path) -> Any:
    """The parsed YAML file; a non-UTF-8 file or a syntax error is a ConfigError naming the file and line."""
    raw = path.read_bytes()
    problem = utf8_problem(raw)
    if problem:
        raise ConfigError(f"{path}: {problem}; save the file as UTF-8")
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {_yaml_problem(error)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TexForceConfig:
    """Defaults, then the YAML file, then the overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return from_dict(TexForceConfig, data).validate()


def save_config(config: TexForceConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc, read from the string under it in the class body: the fields are documented
    there only, so the printed config cannot drift from the code."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for statement, following in itertools.pairwise(body):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def documented_yaml(config: Any, indent: str = "") -> str:
    """`config` as YAML that loads back to it, each field under its doc as a comment
    (`texforce train --print-config`)."""
    docs = field_docs(type(config))
    lines = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        for line in textwrap.wrap(docs.get(item.name, ""), width=100 - len(indent)):
            lines.append(f"{indent}# {line}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{item.name}:")
            lines.append(documented_yaml(value, indent + "  ").rstrip("\n"))
        else:
            dumped = yaml.safe_dump({item.name: value}, default_flow_style=False, width=10**6)
            lines.extend(f"{indent}{line}" for line in dumped.splitlines())
    return "\n".join(lines) + "\n"
