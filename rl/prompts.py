"""Prompt sets: a file with one prompt per line, or an embedded set that needs no download."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rl.config import PromptConfig, utf8_problem

log = logging.getLogger("texforce")


class PromptsError(ValueError):
    """A prompt file that is missing, empty or not UTF-8 text (a user error: one line, exit code 2)."""

COLORS = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple"]
_OBJECTS = ["ball", "car", "house", "flower", "apple", "bird", "cup", "hat"]
_ANIMALS = ["cat", "dog", "bird", "horse", "fish", "dragon"]
_ACTIVITIES = ["sitting in a field", "in the city", "on the grass", "in a forest", "by the sea"]

BUILTIN = {
    "colors": [f"a {color} {obj}" for color in COLORS for obj in _OBJECTS],
    "animals": [f"a photo of a {a} {act}" for a in _ANIMALS for act in _ACTIVITIES],
}


def load_prompts(config: PromptConfig) -> list[str]:
    """The prompt list named by the config; a missing, empty or non-UTF-8 file is a PromptsError."""
    if config.file is None:
        return list(BUILTIN[config.builtin])
    return read_prompt_file(config.file, option="prompts.file, or --prompts")


def read_prompt_file(file: str | Path, *, option: str) -> list[str]:
    """The non-empty lines of a UTF-8 prompt file; `option` names where the path came from, for the error."""
    path = Path(file)
    if not path.exists():
        raise PromptsError(f"prompt file not found: {path} ({option}); one prompt per line")
    if not path.is_file():
        raise PromptsError(f"prompt file {path} is not a file ({option}); pass a text file, one prompt per line")
    raw = path.read_bytes()
    problem = utf8_problem(raw)
    if problem:
        raise PromptsError(f"prompt file {path}: {problem}; save it as UTF-8 text, one prompt per line")
    prompts = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
    if not prompts:
        raise PromptsError(f"prompt file {path} has no prompts; write one prompt per line")
    return prompts


def long_prompts(prompts: list[str], tokenizer) -> list[str]:
    """The prompts longer than the tokenizer's `model_max_length` (with its start/end tokens):
    Stable Diffusion encodes only their first tokens."""
    distinct = list(dict.fromkeys(prompts))
    ids = tokenizer(distinct, truncation=False, verbose=False).input_ids
    return [p for p, tokens in zip(distinct, ids) if len(tokens) > tokenizer.model_max_length]


def warn_long_prompts(prompts: list[str], tokenizer, *, source: str) -> int:
    """Log one warning naming how many distinct prompts will be truncated; returns that number."""
    long = long_prompts(prompts, tokenizer)
    if long:
        log.warning(
            "%d of %d prompts in %s are longer than the tokenizer's %d tokens and will be truncated, e.g. %r",
            len(long), len(set(prompts)), source, tokenizer.model_max_length, long[0][:80],
        )
    return len(long)


def warn_trained_evaluation_prompts(train: list[str], evaluation: list[str]) -> int:
    """Log one warning when held-out prompts are also trained on (compared ignoring case and spacing): their gain
    would not measure generalisation. Returns how many distinct evaluation prompts are trained on."""
    def key(prompt: str) -> str:
        return " ".join(prompt.lower().split())

    trained = {key(p) for p in train}
    seen = sorted({p for p in evaluation if key(p) in trained})
    if seen:
        log.warning("%d of %d evaluation prompts (evaluation.prompts_file) are also training prompts, e.g. %r: the "
                    "held-out gain is then partly a training one", len(seen), len(set(evaluation)), seen[0][:80])
    return len(seen)


def epoch_prompts(
    prompts: list[str], *, seed: int, epoch: int, num_samples: int, group_size: int = 1, order: str = "random"
) -> tuple[list[str], list[int]]:
    """This epoch's prompts and per-sample noise seeds, a pure function of (seed, epoch).

    With group_size k, num_samples/k prompts are drawn and each is repeated k times in a row.
    `order` is PromptConfig.order; the noise seeds do not depend on it, so two runs that differ
    only in the order differ only in their prompts.
    """
    if order not in ("random", "cycle"):
        raise ValueError(f"unknown prompt order {order!r}; use 'random' or 'cycle'")
    num_drawn = num_samples // group_size
    rng = np.random.default_rng([seed, epoch])
    drawn = rng.choice(len(prompts), size=num_drawn, replace=True)  # drawn in both orders: the noise seeds follow it
    if order == "cycle":
        drawn = cycled_indices(len(prompts), seed=seed, start=epoch * num_drawn, count=num_drawn)
    chosen = [prompts[i] for i in drawn for _ in range(group_size)]
    seeds = rng.integers(0, 2**31 - 1, size=num_samples).tolist()
    return chosen, seeds


def group_start_seeds(seeds: list[int], group_size: int) -> list[int]:
    """Each sample's x_T seed when a prompt group shares its start (sample.shared_start_noise): the seed
    of its group's first sample. Groups are `group_size` consecutive samples, as `epoch_prompts` lays them out."""
    return [seeds[i - i % group_size] for i in range(len(seeds))]


def cycled_indices(num_prompts: int, *, seed: int, start: int, count: int) -> list[int]:
    """Positions start..start+count-1 of an endless sequence of shuffled passes over range(num_prompts);
    pass p is a permutation drawn from (seed, p), so any epoch's slice is computed without the ones before."""
    passes = range(start // num_prompts, (start + count - 1) // num_prompts + 1)
    sequence = np.concatenate([np.random.default_rng([seed, p, 1]).permutation(num_prompts) for p in passes])
    offset = start - passes[0] * num_prompts
    return sequence[offset:offset + count].tolist()
