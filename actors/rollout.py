"""An epoch's rollout as the driver holds it: the trajectories stay where the samplers put them.

On Ray each shard's images and each of its samples' trajectories are object refs in the object
store; the driver keeps the refs, the prompts and the scores, fetches only the few images it plots,
and hands the refs to the learners, where each rank fetches the rows it trains on. So the driver's
memory does not grow with the latents of an epoch (bench/driver_memory.py). Inline, the same fields
hold the objects themselves.
"""
from __future__ import annotations

import bisect
import itertools
import sys
from dataclasses import dataclass

import torch

from actors.reward import RewardScores
from rl.lora import PolicyWeights
from rl.sampling import Trajectories


def _fetch(items: list) -> list:
    """The objects behind Ray refs (Ray mode: all are refs); inline, the objects themselves.
    Inline runs never import Ray (a ref exists only once it is imported), so they run where it is absent."""
    ray = sys.modules.get("ray")
    return ray.get(list(items)) if ray and items and isinstance(items[0], ray.ObjectRef) else list(items)


def is_lost(error: Exception) -> bool:
    """An object a call needed was lost (its only copy was on a node that died; Ray: ObjectLostError),
    raised as such or as the cause of the task that read it. Never true inline (Ray not imported)."""
    ray = sys.modules.get("ray")
    lost = () if ray is None else ray.exceptions.ObjectLostError
    return isinstance(error, lost) or isinstance(getattr(error, "cause", None), lost)


@dataclass
class TrajectoryShards:
    """Per shard, each sample's trajectory (a ref on Ray, the object inline), and the rows `keep`
    of the epoch that go on to training (None = all): what the driver sends a learner instead of the
    latents. Each sample is its own object so that a learner rank fetches only the rows it trains on."""

    shards: list[list]
    keep: torch.Tensor | None = None

    def fetch(self, rows: torch.Tensor | None = None) -> Trajectories:
        """`rows` (positions among the kept rows; None = all) as one batch, in that order (called
        where the trajectories are used: on the learner)."""
        parts, lost = self.fetch_each(rows)
        if lost:
            raise TrajectoriesLostError(lost)
        return Trajectories.cat(parts)

    def fetch_each(self, rows: torch.Tensor | None = None) -> tuple[list, list[int]]:
        """The trajectory of each of `rows` (None where lost) and the indices of the shards that
        lost one: its only copy was in the object store of a node that died (Ray: ObjectLostError)."""
        samples = [(shard, sample) for shard, samples in enumerate(self.shards) for sample in samples]
        epoch_rows = range(len(samples)) if self.keep is None else self.keep.tolist()
        if rows is not None:
            epoch_rows = [epoch_rows[r] for r in rows.tolist()]
        wanted = [samples[r] for r in epoch_rows]
        try:
            return _fetch([sample for _, sample in wanted]), []
        except Exception as error:
            if not is_lost(error):
                raise
        parts, lost = [], set()
        for shard, ref in wanted:
            try:
                parts.extend(_fetch([ref]))
            except Exception as error:
                if not is_lost(error):
                    raise
                parts.append(None)
                lost.add(shard)
        return parts, sorted(lost)


class TrajectoriesLostError(RuntimeError):
    """Shards of a batch were lost with the node that held them; the learners changed nothing,
    and the driver samples those shards again (`RayWorkers.resample`)."""

    def __init__(self, shards: list[int]):
        super().__init__(shards)
        self.shards = shards

    def __str__(self) -> str:
        return f"the trajectories of shard(s) {self.shards} were lost with the node that held them"


@dataclass
class Rollout:
    """prompts [B] and scores of an epoch's samples in epoch order; per shard (`sizes` rows each)
    each sample's trajectory and the shard's uint8 images, as refs (Ray) or objects (inline)."""

    prompts: list[str]
    scores: RewardScores
    sizes: list[int]
    trajectory_shards: list
    image_shards: list
    keep: torch.Tensor | None = None  # the rows to train on, after non-finite rewards are dropped
    # Ray: what each shard was sampled from, (prompts, seeds, start seeds), and with which LoRA, so
    # that a shard lost with its node can be sampled again (`RayWorkers.resample`)
    shard_inputs: list | None = None
    weights: PolicyWeights | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, keep: torch.Tensor) -> "Rollout":
        """Only rows `keep` (positions in this rollout) go on to the advantages and the learner."""
        rows = keep if self.keep is None else self.keep[keep]
        return Rollout([self.prompts[i] for i in keep.tolist()], RewardScores(
            self.scores.scores[keep], {k: v[keep] for k, v in self.scores.parts.items()}),
            self.sizes, self.trajectory_shards, self.image_shards, rows, self.shard_inputs, self.weights)

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
