"""What one trial (or one `texforce eval`) runs: alphas -> fused LoRA -> pipeline -> seeded set -> scores.

The pipeline, the reward models and the parsed LoRA files are cached per process (module-level,
keyed by what identifies them), so a Tune worker that runs many trials loads each once; only
the fused LoRA is swapped per trial (`unload_lora_weights` + `load_lora_weights`). No Ray here.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tune.evaluate import EvalResult, EvalSettings, evaluate
from tune.fusion import fuse, load_fused
from tune.lora_io import LoraFile, read_lora

_PIPELINES: dict[tuple[str, str, str], object] = {}
_REWARDS: dict[tuple[str, str, tuple], object] = {}
_LORAS: dict[str, LoraFile] = {}
LOADS: Counter = Counter()
"""How many times this process loaded a pipeline / reward / LoRA file (a trial reports it)."""


@dataclass(frozen=True)
class FusionJob:
    """Everything an evaluation needs besides the alphas; small and picklable (sent to Tune workers)."""

    model: str
    """Base model: a local diffusers directory (or a reachable hub id)."""
    loras: tuple[str, ...]
    """LoRA files (or directories with pytorch_lora_weights.safetensors), in alpha order."""
    prompts: tuple[str, ...]
    """Evaluation prompts."""
    reward: str
    """Reward spec, e.g. "imagereward:1,aesthetic:0.2"; the objective is its weighted sum."""
    settings: EvalSettings = field(default_factory=EvalSettings)
    """How the seeded evaluation set is drawn."""
    device: str = "auto"
    """Device for the pipeline and the reward models ("auto": CUDA when available)."""
    dtype: str = "float32"
    """Pipeline dtype."""
    reward_paths: tuple[tuple[str, str], ...] = ()
    """Reward model files as (key, path) pairs (see `texforce rewards list`)."""


def cached_pipeline(model: str, device: str, dtype: str):
    from rl.models import load_pipeline

    key = (model, device, dtype)
    if key not in _PIPELINES:
        _PIPELINES[key] = load_pipeline(model, dtype=dtype, device=device)
        LOADS["pipeline"] += 1
    return _PIPELINES[key]


def cached_reward(spec: str, device: str, paths: tuple[tuple[str, str], ...]):
    from rewards import build_reward

    key = (spec, device, paths)
    if key not in _REWARDS:
        _REWARDS[key] = build_reward(spec, device=device, paths=dict(paths) or None)
        LOADS["reward"] += 1
    return _REWARDS[key]


def cached_lora(path: str) -> LoraFile:
    if path not in _LORAS:
        _LORAS[path] = read_lora(path)
        LOADS["lora"] += 1
    return _LORAS[path]


def evaluate_alphas(job: FusionJob, alphas: Sequence[float], *, progress: bool = False) -> EvalResult:
    """Fuse `job.loras` with `alphas` in memory, load into the cached pipeline, evaluate (`progress`:
    a sampling bar, for `texforce eval`; a Tune trial stays quiet)."""
    from rl.models import resolve_device

    if len(alphas) != len(job.loras):
        raise ValueError(f"{len(job.loras)} LoRAs but {len(alphas)} alphas")
    device = str(resolve_device(job.device))
    pipe = cached_pipeline(job.model, device, job.dtype)
    reward = cached_reward(job.reward, device, job.reward_paths)
    if job.loras:
        load_fused(pipe, fuse([cached_lora(p) for p in job.loras], alphas))
    else:
        pipe.unload_lora_weights()
    return evaluate(pipe, reward, list(job.prompts), job.settings, reward_device=device, progress=progress)
