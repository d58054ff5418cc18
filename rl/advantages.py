"""Advantages from rewards: per-prompt running statistics (DDPO), GRPO-style groups, or the batch.

All functions take rewards as a float numpy array [B] and return advantages [B], already
clipped to [-adv_clip_max, adv_clip_max].
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence

import numpy as np

EPS = 1e-6


def normalize(rewards: np.ndarray, mean: float, std: float) -> np.ndarray:
    return (rewards - mean) / (std + EPS)


class PerPromptStatTracker:
    """Running reward mean/std per prompt over the last `buffer_size` rewards.

    A prompt with fewer than `min_count` rewards in its history (this batch included) is
    normalised with the whole batch's mean/std instead, so early epochs are not noise-driven.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.history: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Add this batch to the history and return its advantages [B]."""
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        prompts_arr = np.asarray(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):
            mask = prompts_arr == prompt
            history = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            history.extend(rewards[mask].tolist())
            if len(history) < self.min_count:
                mean, std = rewards.mean(), rewards.std()
            else:
                mean, std = np.mean(history), np.std(history)
            advantages[mask] = normalize(rewards[mask], mean, std)
        return advantages

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "history": {p: list(h) for p, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        """The saved histories, under this tracker's buffer_size and min_count (a resume's config, which may have
        changed them): a shorter buffer keeps each prompt's newest rewards."""
        self.history = {p: deque(h, maxlen=self.buffer_size) for p, h in state["history"].items()}


def group_advantages(groups: Sequence[Hashable], rewards: np.ndarray) -> np.ndarray:
    """GRPO-style: normalise each reward within the samples of its group in this batch (`groups[i]`, sample i's
    group: its prompt, or `group_keys`'). A group left with a single sample (its mates dropped) gets advantage 0.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    advantages = np.zeros_like(rewards)
    members: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    for rows in members.values():
        advantages[rows] = normalize(rewards[rows], rewards[rows].mean(), rewards[rows].std())
    return advantages


def group_keys(prompts: Sequence[str], rows: Sequence[int], group_size: int, *, shared_start: bool) -> list:
    """The group each sample's advantage is normalised within (advantage.mode=group), for the samples at epoch
    positions `rows` (groups are `group_size` consecutive positions, as `epoch_prompts` lays them out).

    Independent starts: the prompt, so two groups that drew one prompt pool into one (their rewards come from the
    same distribution). Shared starts (sample.shared_start_noise): the prompt's group itself, since each group
    started from its own x_T and its mean is what removes that start's share of the reward's spread."""
    if not shared_start:
        return list(prompts)
    return [(prompt, row // group_size) for prompt, row in zip(prompts, rows)]


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    return normalize(rewards, rewards.mean(), rewards.std())


def compute_advantages(
    prompts: list[str], rewards: np.ndarray, *, mode: str, adv_clip_max: float, tracker: PerPromptStatTracker | None,
    groups: Sequence[Hashable] | None = None,
) -> np.ndarray:
    """Dispatch on `mode` (per_prompt | group | batch), then clip. `groups`: each sample's group in group mode
    (`group_keys`; default its prompt)."""
    if mode == "per_prompt":
        if tracker is None:
            raise ValueError("per_prompt advantages need a PerPromptStatTracker")
        advantages = tracker.update(prompts, rewards)
    elif mode == "group":
        advantages = group_advantages(prompts if groups is None else groups, rewards)
    elif mode == "batch":
        advantages = batch_advantages(rewards)
    else:
        raise ValueError(f"unknown advantage mode {mode!r}; use per_prompt, group or batch")
    return np.clip(advantages, -adv_clip_max, adv_clip_max).astype(np.float32)
