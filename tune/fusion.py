"""Exact LoRA fusion: `deltaW = sum_i alpha_i * deltaW_i`, as one LoRA of rank sum_i r_i.

With `deltaW_i = s_i * B_i @ A_i` (s_i = lora_alpha_i / r_i), stacking

    A = [A_1; A_2; ...]                     [sum r_i, in]
    B = [alpha_1 s_1 B_1, alpha_2 s_2 B_2]  [out, sum r_i]

gives `B @ A = sum_i alpha_i s_i B_i A_i` exactly, and the fused LoRA has scale 1. Mixing the
factors instead (`(sum a_i B_i) @ (sum a_i A_i)`, peft's "linear" `add_weighted_adapter`) adds
cross terms `a_i a_j B_i A_j` and is not the weighted sum. A module missing from a LoRA
contributes zero; within a component every module is zero-padded to one rank so the file
loads with scale 1 in any loader.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rl.config import ConfigError
from tune.lora_io import (
    COMPONENTS,
    LoraFile,
    LoraFormatError,
    read_lora,
    to_state_dict,
    write_lora,
)


@dataclass(frozen=True)
class LoraArg:
    """One `--lora PATH[:ALPHA]` argument; alpha is None when not given."""

    path: str
    alpha: float | None = None


def parse_lora_arg(text: str) -> LoraArg:
    """'A.safetensors:0.6' -> LoraArg('A.safetensors', 0.6); 'A.safetensors' -> alpha None."""
    path, sep, alpha = text.rpartition(":")
    if not sep or "/" in alpha or "\\" in alpha:
        return LoraArg(text)
    if not path:
        raise ConfigError(f"--lora {text!r} names no file; write PATH[:ALPHA], e.g. A.safetensors:0.6")
    try:
        value = float(alpha)
    except ValueError:
        raise ConfigError(
            f"--lora {text!r}: alpha {alpha!r} is not a number; write PATH[:ALPHA], e.g. A.safetensors:0.6"
        ) from None
    if not math.isfinite(value):
        raise ConfigError(f"--lora {text!r}: alpha must be finite")
    before, second, first_alpha = path.rpartition(":")
    if second and before and not Path(path).exists() and _is_number(first_alpha):  # said as a missing file
        raise ConfigError(f"--lora {text!r} gives two alphas ({first_alpha} and {alpha}); write PATH[:ALPHA], e.g. "
                          f"{before}:{alpha}")
    return LoraArg(path, value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class FusedLora:
    """Scale-1 factors of the fused LoRA. modules: full module name -> (down [R, ...], up [out, R, ...])."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    sources: tuple[str, ...]
    alphas: tuple[float, ...]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """peft-format keys; `pipe.load_lora_weights(fused.state_dict())` loads it."""
        return to_state_dict(self.modules)

    def save(self, path: str | Path) -> Path:
        return write_lora(self.modules, path, provenance={"sources": list(self.sources), "alphas": list(self.alphas)})

    def delta(self, module: str) -> torch.Tensor:
        """deltaW of one module, shaped like its weight."""
        down, up = self.modules[module]
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def fuse(loras: Sequence[LoraFile], alphas: Sequence[float]) -> FusedLora:
    """The exact weighted sum of the LoRAs' deltas (module docstring); shapes must agree per module."""
    if len(loras) != len(alphas):
        raise ValueError(f"{len(loras)} LoRAs but {len(alphas)} alphas")
    if not loras:
        raise ValueError("fusion needs at least one LoRA")
    names = sorted({m for lora in loras for m in lora.modules})
    _check_shapes(loras, names)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        downs, ups = [], []
        for lora, alpha in zip(loras, alphas):
            if name in lora.modules:
                m = lora.modules[name]
                downs.append(m.down.float())
                ups.append(m.up.float() * (float(alpha) * m.scale))
        modules[name] = (torch.cat(downs), torch.cat(ups, dim=1))
    return FusedLora(_pad_to_uniform_rank(modules), tuple(lora.path for lora in loras), tuple(float(a) for a in alphas))


def fuse_files(paths: Sequence[str | Path], alphas: Sequence[float]) -> FusedLora:
    return fuse([read_lora(p) for p in paths], alphas)


def _check_shapes(loras: Sequence[LoraFile], names: list[str]) -> None:
    for name in names:
        owners = [lora for lora in loras if name in lora.modules]
        first = owners[0]
        for other in owners[1:]:
            a, b = first.modules[name], other.modules[name]
            if a.delta_shape != b.delta_shape or a.up.shape[2:] != b.up.shape[2:]:
                raise LoraFormatError(
                    f"module {name}: {first.path} adapts a weight of shape {a.delta_shape} but {other.path} one of "
                    f"{b.delta_shape}; were these trained on the same base model?"
                )


def _pad_to_uniform_rank(modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Zero-pad every module of a component to the component's largest rank (exact: zero rows add nothing)."""
    out = {}
    for component in COMPONENTS:
        names = [n for n in modules if n.partition(".")[0] == component]
        if not names:
            continue
        rank = max(modules[n][0].shape[0] for n in names)
        for n in names:
            down, up = modules[n]
            extra = rank - down.shape[0]
            if extra:
                down = torch.cat([down, down.new_zeros((extra, *down.shape[1:]))])
                up = torch.cat([up, up.new_zeros((up.shape[0], extra, *up.shape[2:]))], dim=1)
            out[n] = (down, up)
    return out


def check_base_model(lora: LoraFile, model_dir: Path) -> None:
    """Raise LoraFormatError when `lora` adapts a module the model in `model_dir` lacks, or one of
    another shape: it was trained on another base model. Reads only safetensors headers."""
    from rl.models import component_weight_shapes

    shapes: dict[str, dict[str, tuple[int, ...]] | None] = {}
    for module, factors in lora.modules.items():
        component, _, name = module.partition(".")
        if component not in shapes:
            present = (model_dir / component).is_dir()
            shapes[component] = component_weight_shapes(model_dir, component) if present else {}
        table = shapes[component]
        if table is None:
            continue  # weights not in safetensors: checked when the LoRA loads
        weight = table.get(f"{name}.weight")
        if weight is None:
            raise LoraFormatError(
                f"{lora.path} adapts {module}, which the model {model_dir} does not have: the LoRA was trained on "
                "another base model; pass that model with --model, or a LoRA trained on this one"
            )
        if _squeeze(weight) != _squeeze(factors.delta_shape):
            raise LoraFormatError(
                f"{lora.path} adapts {module} as a {tuple(factors.delta_shape)} weight but the model {model_dir} has "
                f"{tuple(weight)}: the LoRA was trained on another base model; pass that model with --model"
            )


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 1x1 convolution's [out, in, 1, 1] and a linear [out, in] adapt the same weight."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def load_fused(pipe, fused: FusedLora, *, adapter_name: str = "fused") -> None:
    """Replace any LoRA in `pipe` by `fused` (unload first, so trials can reuse one pipeline)."""
    from diffusers.utils import logging as diffusers_logging

    pipe.unload_lora_weights()
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "no LoRA keys for CLIPTextModel" for U-Net-only fusions
    try:
        pipe.load_lora_weights(fused.state_dict(), adapter_name=adapter_name)
    finally:
        diffusers_logging.set_verbosity(verbosity)
