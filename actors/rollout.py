"""An epoch's rollout as the driver holds it: the trajectories stay where the samplers put them.

On Ray each shard's trajectories and images are object refs in the object store; the driver
keeps the refs, the prompts and the scores, fetches only the few images it plots, and hands the
refs to the learners, which fetch the trajectories themselves. So the driver's memory does not
grow with the latents of an epoch (bench/driver_memory.py). Inline, the same fields hold the
objects themselves.
"""
from __future__ import annotations

import bisect
import itertools
import sys
from dataclasses import dataclass

import torch

from actors.reward import RewardScores
from rl.sampling import Trajectories


def _fetch(items: list) -> list:
    """The objects behind Ray refs (Ray mode: all are refs); inline, the objects themselves.
    Inline runs never import Ray (a ref exists only once it is imported), so they run where it is absent."""
    ray = sys.modules.get("ray")
    return ray.get(list(items)) if ray and items and isinstance(items[0], ray.ObjectRef) else list(items)


@dataclass
class TrajectoryShards:
    """The rows `keep` (epoch order; None = all) of per-shard trajectories, as refs or objects:
    what the driver sends a learner instead of the latents."""

    shards: list
    keep: torch.Tensor | None = None

    def fetch(self) -> Trajectories:
        """The kept rows as one batch (called where the trajectories are used: on the learner)."""
        trajectories = Trajectories.cat(_fetch(self.shards))
        return trajectories if self.keep is None else trajectories.select(self.keep)


@dataclass
class Rollout:
    """prompts [B] and scores of an epoch's samples in epoch order; per shard (`sizes` rows each)
    the trajectories and the uint8 images, as refs (Ray) or objects (inline)."""

    prompts: list[str]
    scores: RewardScores
    sizes: list[int]
    trajectory_shards: list
    image_shards: list
    keep: torch.Tensor | None = None  # the rows to train on, after non-finite rewards are dropped

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, keep: torch.Tensor) -> "Rollout":
        """Only rows `keep` (positions in this rollout) go on to the advantages and the learner."""
        rows = keep if self.keep is None else self.keep[keep]
        return Rollout([self.prompts[i] for i in keep.tolist()], RewardScores(
            self.scores.scores[keep], {k: v[keep] for k, v in self.scores.parts.items()}),
            self.sizes, self.trajectory_shards, self.image_shards, rows)

    def trajectories(self) -> TrajectoryShards:
        return TrajectoryShards(self.trajectory_shards, self.keep)

    def images(self, rows: list[int]) -> torch.Tensor:
        """uint8 [len(rows), 3, H, W] images of `rows` (positions in this rollout), fetching only
        the shards they are in."""
        if not rows:
            return torch.empty(0, dtype=torch.uint8)
        epoch_rows = rows if self.keep is None else self.keep[rows].tolist()
        starts = list(itertools.accumulate(self.sizes, initial=0))
        where = [(bisect.bisect_right(starts, r) - 1, r) for r in epoch_rows]  # (shard, epoch row)
        needed = sorted({s for s, _ in where})
        fetched = dict(zip(needed, _fetch([self.image_shards[s] for s in needed])))
        return torch.stack([fetched[s][r - starts[s]] for s, r in where])
