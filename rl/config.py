"""Typed run configuration: dataclasses with the published TexForce defaults.

A config is a tree of dataclasses. It is built from YAML and `section.key=value` overrides;
an unknown key or a value of the wrong type is an error that names the key and the closest
valid one. Derived values are computed in one place (`TexForceConfig.validate`).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad key or value in a config file or an override."""


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


@dataclass
class TrainConfig:
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
    """Linear warmup optimizer steps before the cosine decay."""
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
    papers do). Kept for old configs: a step's noise follows its gain (`max_step_gain`), not
    1/sigma_t; 0.05 happens to drop the one high-gain step (onto t=1) and the harmless last one."""
    max_step_gain: float = 0.0
    """Steps whose gain |d mean / d eps_hat| / sigma_t exceeds this are never trained (0 = off); 2 drops
    the step onto t=1 of SD's schedule, whose SNR jump makes its log-prob gradient mostly noise."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to the base model's step distribution, per trained step (0 = off,
    as in TexForce). Costs one extra U-Net pass per trained step with the LoRA disabled."""


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
    """Data-parallel learners (gradients all-reduced with gloo on CPU, nccl on GPU)."""
    gpus_per_learner: float = 0.0
    """GPUs per learner."""
    cpus_per_learner: float = 1.0
    """CPUs per learner."""
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
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardSettings = field(default_factory=RewardSettings)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def validate(self) -> "TexForceConfig":
        """Check cross-field constraints; raise ConfigError naming the field."""
        checks = [
            (self.sample.num_steps >= 1, "sample.num_steps must be >= 1"),
            (self.sample.eta > 0, "sample.eta must be > 0: with eta=0 DDIM is deterministic and has no log-prob"),
            (0 < self.train.timestep_fraction <= 1, "train.timestep_fraction must be in (0, 1]"),
            (self.train.min_sigma >= 0, "train.min_sigma must be >= 0"),
            (self.train.kl_coef >= 0, "train.kl_coef must be >= 0"),
            (self.train.clip_range > 0, "train.clip_range must be > 0"),
            (self.lora.rank >= 1, "lora.rank must be >= 1"),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.resources.num_samplers >= 1, "resources.num_samplers must be >= 1"),
            (self.resources.num_reward_actors >= 1, "resources.num_reward_actors must be >= 1"),
            (self.resources.num_learners >= 1, "resources.num_learners must be >= 1"),
            (self.advantage.group_size >= 2, "advantage.group_size must be >= 2"),
            (
                self.advantage.mode != "group" or self.samples_per_epoch % self.advantage.group_size == 0,
                "samples per epoch (sample.batch_size * sample.num_batches_per_epoch) must be a multiple of "
                "advantage.group_size in group mode",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    @property
    def samples_per_epoch(self) -> int:
        return self.sample.batch_size * self.sample.num_batches_per_epoch


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
        node = data
        for part in parts[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TexForceConfig:
    """Defaults, then the YAML file, then the overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return from_dict(TexForceConfig, data).validate()


def save_config(config: TexForceConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
