"""Loading a Stable Diffusion pipeline from a local directory or a hub id, failing fast."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rl.config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_MAKE_TINY = "or build a tiny one with `texforce make-tiny DIR`"
_COPY_AGAIN = "copy it again from the model's snapshot"


class _NoTorchvisionAdvice(logging.Filter):
    """transformers tells every process that imports a pipeline to install torchvision, whose image processors
    then stand in for the PIL ones. The PIL ones are what this project runs, and a torchvision from PyPI
    replaces the pinned torch with a CUDA build (the Makefile's `setup`), so the advice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionAdvice())


class ModelNotFoundError(FileNotFoundError):
    """The pipeline cannot be found locally or on a reachable hub, or a file of it is missing,
    empty or corrupt (a user error: one line, exit code 2)."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device: str, *, option: str, local: bool) -> None:
    """Raise ConfigError when `device` is not a torch device, or (`local`: it is used in this
    process) names an accelerator this machine does not have. `option` names the setting."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{option}={device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if not local:
        return
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{option}={device}: this machine has no CUDA device; use {option}=cpu (or auto)")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"{option}={device}: this machine has {count} CUDA devices, cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option}={device}: MPS is not available on this machine; use {option}=cpu (or auto)")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def check_model(pretrained: str) -> Path | None:
    """The checked local pipeline directory `pretrained` names (`check_pipeline_dir`), or None
    for a hub id the hub may serve; otherwise raise ModelNotFoundError with the fix."""
    path = Path(pretrained).expanduser()
    if path.exists():
        check_pipeline_dir(path)
        return path
    looks_like_a_path = pretrained.startswith((".", "/", "~")) or "\\" in pretrained or pretrained.count("/") > 1
    if looks_like_a_path:
        raise ModelNotFoundError(
            f"model directory not found: {path}. Pass a local diffusers directory "
            f"(model.pretrained=... or --model ...), {_MAKE_TINY}."
        )
    if _hub_offline():
        raise ModelNotFoundError(
            f"model '{pretrained}' is not a local directory and HF_HUB_OFFLINE is set, so the hub "
            f"cannot be asked. Pass a local diffusers directory (model.pretrained=... or --model ...), {_MAKE_TINY}."
        )
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelNotFoundError(f"{path} is not valid JSON ({error}); {_COPY_AGAIN}") from None
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{path} holds no JSON object; {_COPY_AGAIN}")
    return data


def check_pipeline_dir(directory: Path) -> None:
    """Raise ModelNotFoundError naming the first missing, empty or corrupt piece of a diffusers
    directory. Reads only file names, JSON configs and safetensors headers (cheap)."""
    if not directory.is_dir():
        raise ModelNotFoundError(f"{directory} is not a directory: pass a diffusers pipeline directory, {_MAKE_TINY}.")
    if not any(directory.iterdir()):
        raise ModelNotFoundError(
            f"model directory {directory} is empty: pass the folder written by `save_pretrained` "
            f"(e.g. a downloaded SD 1.5 snapshot), {_MAKE_TINY}."
        )
    index = directory / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(
            f"{directory} has no model_index.json: it is not a diffusers pipeline directory. "
            "Pass the folder written by `save_pretrained` (e.g. a downloaded SD 1.5 snapshot), "
            f"{_MAKE_TINY}."
        )
    components = _read_json(index)
    for name in _REQUIRED_COMPONENTS:
        if name not in components or not (directory / name).is_dir():
            raise ModelNotFoundError(f"{directory} is missing the '{name}' component folder ({directory / name}).")
    _check_tokenizer_files(directory / "tokenizer")
    _read_json(_required_file(directory / "scheduler", "scheduler_config.json"))
    for name in _WEIGHTED_COMPONENTS:
        folder = directory / name
        _read_json(_required_file(folder, "config.json"))
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        if not weights:
            raise ModelNotFoundError(
                f"{folder} has no weights (*.safetensors or *.bin); copy that folder from the model's snapshot again"
            )
        for file in weights:
            if file.suffix == ".safetensors":
                safetensors_header(file)
            elif file.stat().st_size == 0:
                raise ModelNotFoundError(f"{file} is empty; {_COPY_AGAIN}")


def _required_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise ModelNotFoundError(f"{folder} has no {name}; copy that folder from the model's snapshot again")
    return path


def _check_tokenizer_files(folder: Path) -> None:
    for group in _TOKENIZER_FILES:
        files = [folder / name for name in group]
        if all(f.is_file() for f in files):
            empty = [f for f in files if f.stat().st_size == 0]
            if empty:
                raise ModelNotFoundError(
                    f"tokenizer file {empty[0]} is empty; copy the tokenizer/ folder of the same model's snapshot "
                    "(tokenizer.json, or vocab.json + merges.txt) into it again"
                )
            return
    raise ModelNotFoundError(
        f"{folder} holds no tokenizer (tokenizer.json, or vocab.json + merges.txt); copy the tokenizer/ folder "
        "of the same model's snapshot into it (for SD 1.x, the CLIP ViT-L/14 tokenizer)"
    )


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets), read
    without loading any tensor; a truncated or corrupt file is a ModelNotFoundError naming it."""
    size = path.stat().st_size
    fix = "download or copy it again"
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little") if size >= 8 else -1
        if length < 0 or 8 + length > size:
            raise ModelNotFoundError(f"{path} is truncated or not a safetensors file ({size} bytes); {fix}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelNotFoundError(f"{path} has a corrupt safetensors header; {fix}") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise ModelNotFoundError(f"{path} has a corrupt safetensors header; {fix}") from None
    if 8 + length + end != size:
        raise ModelNotFoundError(
            f"{path} is truncated: its header describes {8 + length + end} bytes but the file has {size}; {fix}"
        )
    return header


def component_weight_shapes(directory: Path, component: str) -> dict[str, tuple[int, ...]] | None:
    """Parameter name -> shape of one component, from its safetensors headers (a text encoder's
    `text_model.` prefix dropped); None when the weights are not in safetensors files."""
    files = sorted((directory / component).glob("*.safetensors"))
    if not files:
        return None
    shapes = {}
    for file in files:
        for name, entry in safetensors_header(file).items():
            if name != "__metadata__":
                shapes[name.removeprefix("text_model.")] = tuple(entry["shape"])
    return shapes


def component_skeleton(directory: Path, component: str) -> torch.nn.Module:
    """A pipeline component built from its config on the meta device: its layers and their types, no
    weights read or allocated (0.7 s for an SD-1.5-sized U-Net and text encoder on 2 CPU cores)."""
    import importlib

    library, class_name = _read_json(directory / "model_index.json")[component]
    cls = getattr(importlib.import_module(library), class_name)
    folder = str(directory / component)
    with torch.device("meta"):
        if library == "transformers":
            return cls(cls.config_class.from_pretrained(folder, local_files_only=True))
        return cls.from_config(cls.load_config(folder))


def vae_scale_factor(directory: Path) -> int:
    """Pixels per latent cell: 2 ** (number of VAE blocks - 1), as diffusers computes it."""
    config = _read_json(directory / "vae" / "config.json")
    return 2 ** (len(config.get("block_out_channels", [0])) - 1)


def load_tokenizer(directory: Path):
    """The pipeline's CLIP tokenizer, checked to hold a vocabulary (a missing one loads as a
    useless tokenizer offline)."""
    from transformers import CLIPTokenizer

    folder = directory / "tokenizer"
    fix = "copy the tokenizer/ folder of the same model's snapshot into it"
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"could not load the tokenizer in {folder} ({error}); {fix}") from None
    if len(tokenizer) < 256:
        raise ModelNotFoundError(f"the tokenizer in {folder} has only {len(tokenizer)} tokens; {fix}")
    return tokenizer


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
    local = check_model(pretrained)
    source = str(local) if local is not None else pretrained
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
    target = resolve_device(device)
    if target.type == "cpu" and dtype in ("bfloat16", "float16"):
        pipe.unet.set_attn_processor(
            {name: CpuFloat32AttentionProcessor(processor) for name, processor in pipe.unet.attn_processors.items()}
        )
    # diffusers warns that a float16 pipeline "cannot run" on the CPU: it runs (tests/test_precision.py), slowly
    return pipe.to(target, silence_dtype_warnings=True)


class Float32CpuAttention(TorchFunctionMode):
    """Within it, half-precision `scaled_dot_product_attention` on the CPU runs in float32, cast back."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        query = args[0] if args else kwargs.get("query")
        if (func is not F.scaled_dot_product_attention or not isinstance(query, torch.Tensor)
                or query.device.type != "cpu" or query.dtype not in (torch.bfloat16, torch.float16)):
            return func(*args, **kwargs)
        def up(x):  # query, key, value and a float (additive) mask; a boolean mask and the rest as they are
            return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        args = [up(x) for x in args[:4]] + list(args[4:])
        kwargs = {k: up(v) if k in ("query", "key", "value", "attn_mask") else v for k, v in kwargs.items()}
        return func(*args, **kwargs).to(query.dtype)


class CpuFloat32AttentionProcessor:
    """Wraps a U-Net attention processor so that its attention product runs in float32 on the CPU.

    Why: PyTorch's CPU flash-attention backward in bfloat16 is ~8x slower than in float32 at small
    head dimensions (the toy model's 8: 4.2 s of a 5.6-s bfloat16 PPO minibatch, against 0.4 s in
    float32), while the upcast costs ~10% of the forward. The weights, the projections and
    everything outside the attention product stay in the pipeline's dtype; GPUs are not touched.
    """

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        with Float32CpuAttention():
            return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
