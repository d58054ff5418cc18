"""LoRA on the text encoder and/or U-Net through peft, and its weights as one versioned object.

Saved LoRAs are diffusers-format safetensors (`pytorch_lora_weights.safetensors` with
`text_encoder.` / `unet.` prefixes and the peft config as metadata), so
`pipe.load_lora_weights(dir)` loads them with the rank and alpha they were trained with.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rl.config import LoraSettings

ADAPTER = "default"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class PolicyWeights:
    """The trainable LoRA tensors of one policy version, as plain CPU tensors.

    `text_encoder` / `unet` are peft state dicts (keys without the adapter name), or None
    when that module carries no LoRA. This is the object the learner hands to samplers.
    """

    version: int
    text_encoder: dict[str, torch.Tensor] | None = None
    unet: dict[str, torch.Tensor] | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def num_bytes(self) -> int:
        tensors = list((self.text_encoder or {}).values()) + list((self.unet or {}).values())
        return sum(t.numel() * t.element_size() for t in tensors)


POLICY_COMPONENTS = {"text_encoder": ("text_encoder",), "unet": ("unet",), "both": ("text_encoder", "unet")}
"""The pipeline components that carry the trainable LoRA, per `lora.policy`."""
LORA_LAYER_TYPES = (nn.Linear, nn.Conv2d)
"""The layers a LoRA may target: the ones whose factors `save_lora` writes as diffusers' lora_A / lora_B and
`pipe.load_lora_weights` (and `tune.lora_io`) read back. peft also wraps embeddings, whose factors neither does."""


def policy_modules(pipe, policy: str) -> dict[str, nn.Module]:
    """The pipeline modules that carry the trainable LoRA for `policy`."""
    return {name: getattr(pipe, name) for name in POLICY_COMPONENTS[policy]}


def component_targets(settings: LoraSettings, component: str) -> list[str]:
    """The module names `settings` gives a LoRA in `component` (`text_encoder` or `unet`)."""
    return list({"text_encoder": settings.text_encoder_targets, "unet": settings.unet_targets}[component])


def check_lora_targets(settings: LoraSettings, model_dir: Path) -> None:
    """Raise ConfigError unless every `lora.<component>_targets` entry names at least one Linear or Conv2d
    layer of its component. Unchecked, a name that matches nothing stops the learner with peft's traceback,
    and one that matches an embedding trains a whole epoch and then fails to save its checkpoint."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from rl.config import ConfigError
    from rl.models import component_skeleton

    for component in POLICY_COMPONENTS[settings.policy]:
        option = f"lora.{component}_targets"
        try:
            skeleton = component_skeleton(model_dir, component)
        except (AttributeError, ImportError, OSError, TypeError, ValueError):  # a class this stack cannot build
            continue  # from its config: loading the model reports it, this check has nothing to add
        layers = {name: layer for name, layer in skeleton.named_modules() if name}
        trainable = sorted({_short_name(name) for name, layer in layers.items() if isinstance(layer, LORA_LAYER_TYPES)})
        hint = f"its Linear and Conv2d layers end in: {', '.join(trainable)}"
        targets = component_targets(settings, component)
        if not targets:
            raise ConfigError(f"{option} is empty but lora.policy={settings.policy} trains the {component}; {hint}")
        for target in targets:
            matcher = LoraConfig(target_modules=[target])
            matched = {name: layer for name, layer in layers.items() if check_target_module_exists(matcher, name)}
            if not matched:
                raise ConfigError(f"{option}: '{target}' names no layer of {model_dir / component}; {hint}")
            for name, layer in matched.items():
                if not isinstance(layer, LORA_LAYER_TYPES):
                    raise ConfigError(
                        f"{option}: '{target}' matches {name} ({type(layer).__name__}); a LoRA here trains and is "
                        f"saved on Linear and Conv2d layers only ({hint})"
                    )


def _short_name(module_name: str) -> str:
    """The part of a layer's name a target usually gives: `q_proj`, or `to_out.0` for a layer in a list."""
    parts = module_name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def add_lora(pipe, settings: LoraSettings) -> list[nn.Parameter]:
    """Add a fresh LoRA adapter per `settings.policy`; return the trainable parameters (float32)."""
    from peft import LoraConfig

    params: list[nn.Parameter] = []
    for name, module in policy_modules(pipe, settings.policy).items():
        module.add_adapter(
            LoraConfig(
                r=settings.rank,
                lora_alpha=settings.alpha,
                init_lora_weights=settings.init if settings.init != "zeros" else False,
                target_modules=component_targets(settings, name),
            )
        )
        if settings.init == "zeros":  # B=0 and A=0: the gradient is zero too, used only in tests
            for p in _lora_parameters(module):
                nn.init.zeros_(p)
        for p in _lora_parameters(module):
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


@contextmanager
def adapters_disabled(pipe, policy: str) -> Iterator[None]:
    """Run `pipe` as its base model (the KL reference): the policy's LoRA is off inside the block."""
    modules = list(policy_modules(pipe, policy).values())
    for module in modules:
        module.disable_adapters()
    try:
        yield
    finally:
        for module in modules:
            module.enable_adapters()


def _lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


def get_policy_weights(pipe, policy: str, version: int) -> PolicyWeights:
    """Detached CPU copies of the LoRA tensors of `pipe`."""
    from peft.utils import get_peft_model_state_dict

    state = {
        name: {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER).items()}
        for name, module in policy_modules(pipe, policy).items()
    }
    return PolicyWeights(version=version, text_encoder=state.get("text_encoder"), unet=state.get("unet"))


def set_policy_weights(pipe, weights: PolicyWeights) -> None:
    """Copy `weights` into the pipeline's existing LoRA adapters; shapes must match exactly."""
    for name in ("text_encoder", "unet"):
        state = getattr(weights, name)
        if state is None:
            continue
        module = getattr(pipe, name)
        current = {k: p for k, p in module.named_parameters() if "lora_" in k}
        by_key = {_strip_adapter(k): p for k, p in current.items()}
        missing = sorted(set(by_key) - set(state))
        unexpected = sorted(set(state) - set(by_key))
        if missing or unexpected:
            raise ValueError(
                f"LoRA weights for {name} do not match its adapter: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}. Were they trained with the same lora.* settings and base model?"
            )
        with torch.no_grad():
            for key, param in by_key.items():
                if param.shape != state[key].shape:
                    raise ValueError(
                        f"LoRA shape mismatch at {name}.{key}: adapter {tuple(param.shape)}, weights "
                        f"{tuple(state[key].shape)}; check lora.rank."
                    )
                param.copy_(state[key].to(param.device, param.dtype))


def _strip_adapter(key: str) -> str:
    return key.replace(f".{ADAPTER}.", ".")


def save_lora(weights: PolicyWeights, settings: LoraSettings, directory: str | Path) -> Path:
    """Write `weights` as diffusers-format safetensors (with the LoRA config as metadata)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    for name in ("text_encoder", "unet"):
        state = getattr(weights, name)
        if state is None:
            continue
        state = convert_state_dict_to_diffusers(dict(state))
        kwargs[f"{name}_lora_layers"] = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=component_targets(settings, name))
        kwargs[f"{name}_lora_adapter_metadata"] = config.to_dict()
    if not kwargs:
        raise ValueError("these PolicyWeights hold no LoRA tensors to save")
    StableDiffusionPipeline.save_lora_weights(directory, weight_name=LORA_WEIGHTS_NAME, **kwargs)
    return follow_umask(directory / LORA_WEIGHTS_NAME)


def follow_umask(path: Path) -> Path:
    """Give a file the mode `open` gives new files (0o666 less the umask) and return it: safetensors writes
    owner-only (0600) files, which the other users of a shared run or sweep folder could not read."""
    umask = os.umask(0o077)  # reading it means setting it: meanwhile, other threads' new files are owner-only
    os.umask(umask)
    path.chmod(0o666 & ~umask)
    return path
