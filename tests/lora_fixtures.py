"""Helpers that write real LoRA files on the tiny pipeline (the project's own save path)."""
from __future__ import annotations

from pathlib import Path

import torch

from rl.config import LoraSettings
from rl.lora import add_lora, get_policy_weights, save_lora
from rl.models import load_pipeline


def make_lora(
    model_dir: str,
    directory: Path,
    *,
    rank: int,
    alpha: float,
    seed: int,
    policy: str = "both",
    scale: float = 0.1,
    unet_targets: list[str] | None = None,
) -> Path:
    """Add a LoRA to a fresh tiny pipeline, set its factors to seeded noise, save it; return the file."""
    pipe = load_pipeline(model_dir, device="cpu")
    settings = LoraSettings(policy=policy, rank=rank, alpha=alpha)
    if unet_targets is not None:
        settings.unet_targets = list(unet_targets)
    params = add_lora(pipe, settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(scale * torch.randn(p.shape, generator=generator))
    return save_lora(get_policy_weights(pipe, policy, version=0), settings, directory)


def merged_deltas(model_dir: str, lora: dict[str, torch.Tensor] | str | Path) -> dict[str, torch.Tensor]:
    """Effective weight change of every module diffusers adapts: load, `fuse_lora`, W_merged - W_base.

    Keys are full module names ("text_encoder.encoder...q_proj", "unet....to_q").
    """
    base = load_pipeline(model_dir, device="cpu")
    pipe = load_pipeline(model_dir, device="cpu")
    pipe.load_lora_weights(dict(lora) if isinstance(lora, dict) else str(lora))
    adapted = {}
    for component in ("text_encoder", "unet"):
        module = getattr(pipe, component)
        for name, sub in module.named_modules():
            if hasattr(sub, "base_layer") and hasattr(sub, "lora_A"):
                adapted[f"{component}.{name}"] = sub
    pipe.fuse_lora(lora_scale=1.0)
    deltas = {}
    for full, sub in adapted.items():
        component, _, name = full.partition(".")
        base_weight = getattr(base, component).get_submodule(name).weight
        deltas[full] = (sub.base_layer.weight - base_weight).detach().float()
    return deltas
