"""Loading a Stable Diffusion pipeline from a local directory or a hub id, failing fast."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rl.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelNotFoundError(FileNotFoundError):
    """The pipeline could be found neither locally nor on a reachable hub."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_pipeline_dir(directory: Path) -> None:
    """Raise ModelNotFoundError naming the first missing piece of a diffusers directory."""
    index = directory / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(
            f"{directory} has no model_index.json: it is not a diffusers pipeline directory. "
            "Pass the folder written by `save_pretrained` (e.g. a downloaded SD 1.5 snapshot), "
            "or build a tiny one with `texforce make-tiny DIR`."
        )
    components = json.loads(index.read_text())
    for name in _REQUIRED_COMPONENTS:
        if name not in components or not (directory / name).is_dir():
            raise ModelNotFoundError(f"{directory} is missing the '{name}' component folder ({directory / name}).")


def load_pipeline_from_config(model: ModelConfig):
    """`load_pipeline` with the settings of a run's `model` section."""
    return load_pipeline(model.pretrained, dtype=model.dtype, device=model.device, revision=model.revision)


def load_pipeline(pretrained: str, *, dtype: str = "float32", device: str = "auto", revision: str | None = None):
    """A frozen StableDiffusionPipeline with a DDIM scheduler, on `device`.

    `pretrained` is a local directory, or a hub id where a hub is reachable. Every module is
    frozen here; LoRA parameters added afterwards are the only trainable ones.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # loading bars from several actors at once only garble the driver's log
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    path = Path(pretrained).expanduser()
    if path.exists():
        check_pipeline_dir(path)
        source = str(path)
    elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelNotFoundError(
            f"model '{pretrained}' is not a local directory and HF_HUB_OFFLINE is set, so the hub "
            "cannot be asked. Pass a local diffusers directory (model.pretrained=/path/to/sd) "
            "or build one with `texforce make-tiny DIR`."
        )
    else:
        source = pretrained
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=DTYPES[dtype], revision=revision, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(
            f"could not load a Stable Diffusion pipeline from '{pretrained}': {error}. "
            "Pass a local diffusers directory or a hub id reachable from this machine."
        ) from error
    if len(pipe.tokenizer) < 256:
        raise ModelNotFoundError(f"the tokenizer loaded from '{pretrained}' has only {len(pipe.tokenizer)} tokens.")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))
