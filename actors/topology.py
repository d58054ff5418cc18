"""Where the roles run: in this process (inline) or as Ray actors. The only place that knows
how many samplers, reward actors and learners there are and what each one needs.

Both classes offer the same four phases the driver calls: `rollout`, `update`,
`get_weights`, and the learner checkpoint state.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque

import torch

from actors.learner import LearnerWorker
from actors.reward import RewardActor, RewardScores
from actors.sampler import SamplerWorker
from rl.config import TexForceConfig
from rl.lora import PolicyWeights
from rl.sampling import Trajectories

log = logging.getLogger("texforce")


class InsufficientResourcesError(RuntimeError):
    """The cluster cannot host the requested actors."""


def _threads(cpus: float) -> int:
    return max(1, math.floor(cpus))


def _shards(prompts: list[str], seeds: list[int], size: int) -> list[tuple[list[str], list[int]]]:
    return [(prompts[i : i + size], seeds[i : i + size]) for i in range(0, len(prompts), size)]


class InlineWorkers:
    """All roles in this process, sharing one pipeline: the debugger-friendly mode."""

    def __init__(self, config: TexForceConfig):
        self.config = config
        self.learner = LearnerWorker(config)
        self.sampler = SamplerWorker(config, pipe=self.learner.learner.pipe)
        self.reward = RewardActor(config.reward, device=config.model.device)
        self.restarts = 0

    def rollout(self, weights: PolicyWeights, prompts: list[str], seeds: list[int]) -> tuple[Trajectories, RewardScores]:
        trajectories, scores = [], []
        for shard_prompts, shard_seeds in _shards(prompts, seeds, self.config.sample.batch_size):
            traj, images = self.sampler.sample(weights, shard_prompts, shard_seeds)
            trajectories.append(traj)
            scores.append(self.reward.score(images, shard_prompts))
        return Trajectories.cat(trajectories), RewardScores.cat(scores)

    def update(self, trajectories: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        return self.learner.update(trajectories, advantages)

    def get_weights(self) -> PolicyWeights:
        return self.learner.get_weights()

    def learner_state(self) -> dict:
        return self.learner.state_dict()

    def load_learner_state(self, state: dict) -> None:
        self.learner.load_state_dict(state)

    def shutdown(self) -> None:
        pass


def check_resources(config: TexForceConfig) -> None:
    """Fail fast, naming the shortfall, when the cluster cannot host the requested actors."""
    import ray

    r = config.resources
    roles = {
        "sampler": (r.num_samplers, r.cpus_per_sampler, r.gpus_per_sampler),
        "reward actor": (r.num_reward_actors, r.cpus_per_reward_actor, r.gpus_per_reward_actor),
        "learner": (r.num_learners, r.cpus_per_learner, r.gpus_per_learner),
    }
    need = {
        "CPU": sum(n * c for n, c, _ in roles.values()),
        "GPU": sum(n * g for n, _, g in roles.values()),
    }
    deadline = time.monotonic() + r.resource_wait_s
    while True:
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        unplaceable = [
            f"one {role} needs {c:g} CPU / {g:g} GPU but no node has that much"
            for role, (_, c, g) in roles.items()
            if not any(node.get("CPU", 0) >= c and node.get("GPU", 0) >= g for node in nodes)
        ]
        if not short and not unplaceable:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    lines = [f"{k}: requested {want:g}, the cluster has {got:g}" for k, (want, got) in short.items()] + unplaceable
    detail = "; ".join(f"{n} x {role} ({c:g} CPU, {g:g} GPU)" for role, (n, c, g) in roles.items())
    raise InsufficientResourcesError(
        "the Ray cluster cannot host this run: " + "; ".join(lines) + f". Requested: {detail}. "
        "Lower resources.num_* or resources.*_per_* in the config, add nodes, or set "
        "resources.resource_wait_s for an autoscaling cluster."
    )


class RayWorkers:
    """Samplers, reward actors and L learner ranks as Ray actors.

    Weights go out as one `ray.put` per version. Reward scoring of a finished shard overlaps
    with sampling of the next. A sampler or reward actor that dies is restarted by Ray
    (max_restarts) and its shard re-issued; every remote wait has a timeout.
    """

    def __init__(self, config: TexForceConfig):
        import ray

        self.config = config
        r = config.resources
        self.timeout = r.call_timeout_s
        check_resources(config)
        sampler_cls = ray.remote(SamplerWorker).options(
            num_cpus=r.cpus_per_sampler, num_gpus=r.gpus_per_sampler, max_restarts=r.max_restarts
        )
        reward_cls = ray.remote(RewardActor).options(
            num_cpus=r.cpus_per_reward_actor, num_gpus=r.gpus_per_reward_actor, max_restarts=r.max_restarts
        )
        learner_cls = ray.remote(LearnerWorker).options(num_cpus=r.cpus_per_learner, num_gpus=r.gpus_per_learner)
        self.samplers = [
            sampler_cls.remote(config, num_threads=_threads(r.cpus_per_sampler)) for _ in range(r.num_samplers)
        ]
        self.reward_actors = [
            reward_cls.remote(config.reward, device=config.model.device, num_threads=_threads(r.cpus_per_reward_actor))
            for _ in range(r.num_reward_actors)
        ]
        self.learners = [
            learner_cls.remote(config, rank=i, world_size=r.num_learners, num_threads=_threads(r.cpus_per_learner))
            for i in range(r.num_learners)
        ]
        # surface construction errors (missing model, bad reward files) now, not mid-epoch
        self._get([a.ping.remote() for a in self.samplers + self.reward_actors])
        if r.num_learners > 1:
            host, port = self._get(self.learners[0].rendezvous_address.remote())
            self._get([learner.init_process_group.remote(host, port) for learner in self.learners])
        self.restarts = 0

    def _get(self, refs):
        import ray

        return ray.get(refs, timeout=self.timeout)

    def rollout(self, weights: PolicyWeights, prompts: list[str], seeds: list[int]) -> tuple[Trajectories, RewardScores]:
        """Sample every shard and score it; shards whose actor died are re-issued."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        weights_ref = ray.put(weights)
        shards = _shards(prompts, seeds, self.config.sample.batch_size)
        todo = deque(range(len(shards)))
        idle = deque(range(len(self.samplers)))
        trajectory_refs: dict[int, ray.ObjectRef] = {}
        scores: dict[int, RewardScores] = {}
        in_flight: dict[ray.ObjectRef, tuple[str, int, int, ray.ObjectRef | None]] = {}
        attempts: Counter = Counter()
        next_reward = 0

        def score(shard: int, images_ref) -> None:
            nonlocal next_reward
            actor = next_reward % len(self.reward_actors)
            next_reward += 1
            ref = self.reward_actors[actor].score.remote(images_ref, shards[shard][0])
            in_flight[ref] = ("score", shard, actor, images_ref)

        while todo or in_flight:
            while todo and idle:
                shard, sampler = todo.popleft(), idle.popleft()
                traj_ref, images_ref = self.samplers[sampler].sample.options(num_returns=2).remote(
                    weights_ref, *shards[shard]
                )
                trajectory_refs[shard] = traj_ref
                in_flight[images_ref] = ("sample", shard, sampler, None)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=self.timeout)
            if not ready:
                raise TimeoutError(f"no sampler or reward actor answered within {self.timeout:g} s "
                                   "(resources.call_timeout_s)")
            ref = ready[0]
            kind, shard, actor, images_ref = in_flight.pop(ref)
            try:
                value = ray.get(ref)
            except (RayActorError, ActorUnavailableError) as error:
                attempts[(kind, shard)] += 1
                if attempts[(kind, shard)] > self.config.resources.max_restarts:
                    raise RuntimeError(f"{kind} of shard {shard} failed {attempts[(kind, shard)]} times") from error
                self.restarts += 1
                log.warning("%s actor %d died on shard %d (%s); re-issuing", kind, actor, shard, type(error).__name__)
                if kind == "sample":
                    todo.appendleft(shard)
                    idle.append(actor)  # Ray restarts it; calls queue until it is back
                else:
                    score(shard, images_ref)
                continue
            if kind == "sample":
                idle.append(actor)
                score(shard, ref)
            else:
                scores[shard] = value
        trajectories = self._get([trajectory_refs[i] for i in range(len(shards))])
        return Trajectories.cat(trajectories), RewardScores.cat([scores[i] for i in range(len(shards))])

    def update(self, trajectories: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        import ray

        batch_ref, advantages_ref = ray.put(trajectories), ray.put(advantages)
        return self._get([learner.update.remote(batch_ref, advantages_ref) for learner in self.learners])[0]

    def get_weights(self) -> PolicyWeights:
        return self._get(self.learners[0].get_weights.remote())

    def learner_state(self) -> dict:
        return self._get(self.learners[0].state_dict.remote())

    def load_learner_state(self, state: dict) -> None:
        import ray

        state_ref = ray.put(state)
        self._get([learner.load_state_dict.remote(state_ref) for learner in self.learners])

    def shutdown(self) -> None:
        import ray

        try:
            self._get([learner.shutdown.remote() for learner in self.learners])
        finally:
            for actor in self.samplers + self.reward_actors + self.learners:
                ray.kill(actor)
