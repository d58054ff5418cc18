"""Where the roles run: in this process (inline) or as Ray actors. The only place that knows
how many samplers, reward actors and learners there are and what each one needs.

Both classes offer the same phases the driver calls: `rollout` and `start_update` /
`finish_update` (PPO; the driver samples the next epoch between the two),
`train_on_prompts` (gradient learners: the learner group samples, scores and steps itself, so
no samplers or reward actors are started), `get_weights`, and the learner checkpoint state.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Literal

import torch

from actors.learner import LearnerWorker
from actors.reward import RewardActor, RewardScores
from actors.rollout import Rollout, TrajectoriesLostError, TrajectoryShards, is_lost
from actors.sampler import SamplerWorker
from rl.algorithms import get_algorithm
from rl.config import ConfigError, TexForceConfig
from rl.gradient import ScoredSamples
from rl.learner import combine_rank_metrics
from rl.lora import PolicyWeights
from rl.sampling import Trajectories

log = logging.getLogger("texforce")


class InsufficientResourcesError(RuntimeError):
    """The cluster cannot host the requested actors."""


# How long the driver waits, after one learner call fails, for the other ranks' calls to settle and
# show whether a rank died (tests/test_multinode.py: the call of a rank whose node was killed failed
# about 2 s after the kill, the survivors' collective error at once).
RANK_DEATH_GRACE_S = 60.0

# A sampler's return values over this many bytes go to its node's object store instead of inside its
# reply to the driver. Ray inlines returns under 100 KiB (`max_direct_call_object_size`, read from
# the worker's environment) and keeps them in the caller's memory: a toy model's trajectories (21 KiB
# a sample in the demo) would all pass through the driver. Only the version each call returns (a few
# bytes, what the driver waits on) stays inline; the driver still owns the objects, so they outlive a
# sampler's restart. A cluster whose `_system_config` sets the limit overrides this.
SAMPLER_INLINE_BYTES = 1024


def _threads(cpus: float) -> int:
    return max(1, math.floor(cpus))


def _shards(prompts: list[str], seeds: list[int], start_seeds: list[int] | None,
            size: int) -> list[tuple[list[str], list[int], list[int] | None]]:
    """(prompts, seeds, start seeds) of each sampling call of `size` samples."""
    return [(prompts[i : i + size], seeds[i : i + size], None if start_seeds is None else start_seeds[i : i + size])
            for i in range(0, len(prompts), size)]


def _evaluation_rollout(prompts: list[str], shards: list, images: list, scores: list[RewardScores]) -> Rollout:
    """A held-out evaluation that a gradient learner's ranks drew: each shard's images (refs on Ray) and scores,
    no trajectories."""
    return Rollout(list(prompts), RewardScores.cat(scores), [len(p) for p, _, _ in shards], [[] for _ in shards], images)


def as_one_learner(config: TexForceConfig) -> TexForceConfig:
    """The config with which one learner takes the optimizer steps `resources.num_learners` ranks take: their
    global minibatch (train.batch_size is per rank) as its own, so an inline run is the Ray run it debugs. Its
    forward passes then hold all ranks' rows at once."""
    ranks = config.resources.num_learners
    if ranks == 1:
        return config
    return replace(config, train=replace(config.train, batch_size=ranks * config.train.batch_size),
                   resources=replace(config.resources, num_learners=1))


class InlineWorkers:
    """All roles in this process, sharing one pipeline: the debugger-friendly mode."""

    def __init__(self, config: TexForceConfig):
        self.config = config
        self.learner = LearnerWorker(as_one_learner(config))
        if not get_algorithm(config.train.algorithm).samples_in_learner:
            self.sampler = SamplerWorker(config, pipe=self.learner.learner.pipe)
            self.reward = RewardActor(config.reward, device=config.model.device, evaluation_spec=config.evaluation.reward)
        self.restarts = 0

    def rollout(
        self, weights: PolicyWeights, prompts: list[str], seeds: list[int], *, start_seeds: list[int] | None = None,
        on_shard_done: Callable[[str, int], None] | None = None, evaluation: bool = False,
    ) -> Rollout:
        """Sample and score in turn; the sampler shares the learner's pipeline, so older `weights`
        (async sampling after a resume) are put back to the learner's once the rollout is done. A gradient
        learner's held-out evaluation is drawn and scored by the learner (`LearnerWorker.evaluate`)."""
        if evaluation and get_algorithm(self.config.train.algorithm).samples_in_learner:
            return self._evaluate_on_learner(prompts, seeds, on_shard_done)
        self.sampler.version = self.learner.learner.version  # what the shared pipeline holds now
        learner_weights = self.get_weights() if weights.version != self.sampler.version else None
        trajectories, images, scores = [], [], []
        try:
            shards = _shards(prompts, seeds, start_seeds, self.config.sample.batch_size)
            for shard, (shard_prompts, shard_seeds, shard_start_seeds) in enumerate(shards):
                drawn, shard_images, *samples = self.sampler.sample(weights, shard_prompts, shard_seeds,
                                                                    shard_start_seeds, evaluation=evaluation)
                trajectories.append(samples)
                images.append(shard_images)
                scores.append(self.reward.score(shard_images, shard_prompts, evaluation, drawn.images_finite))
                if on_shard_done is not None:
                    on_shard_done("score", shard)
        finally:
            if learner_weights is not None:
                self.sampler.sample_with(learner_weights)
        return Rollout(list(prompts), RewardScores.cat(scores), [len(p) for p, _, _ in shards], trajectories, images)

    def _evaluate_on_learner(self, prompts: list[str], seeds: list[int],
                             on_shard_done: Callable[[str, int], None] | None) -> Rollout:
        """A gradient learner's held-out evaluation: its learner draws and scores each shard (`LearnerWorker.evaluate`)."""
        shards = _shards(prompts, seeds, None, self.config.sample.batch_size)
        images, scores = [], []
        for shard, (shard_prompts, shard_seeds, _) in enumerate(shards):
            shard_images, shard_scores = self.learner.evaluate(shard_prompts, shard_seeds)
            images.append(shard_images)
            scores.append(shard_scores)
            if on_shard_done is not None:
                on_shard_done("score", shard)
        return _evaluation_rollout(prompts, shards, images, scores)

    def start_update(self, trajectories: TrajectoryShards, advantages: torch.Tensor) -> Callable[[], dict[str, float]]:
        """The update to run at `finish_update`: in one process nothing overlaps, so it runs after
        whatever the driver samples in between, which is the order its inputs follow on Ray too."""
        return lambda: self.learner.update(trajectories, advantages)

    @staticmethod
    def finish_update(pending: Callable[[], dict[str, float]]) -> dict[str, float]:
        return combine_rank_metrics([pending()])

    def update(self, trajectories: TrajectoryShards | Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        return self.finish_update(self.start_update(trajectories, advantages))

    def train_on_prompts(self, prompts: list[str], seeds: list[int]) -> tuple[dict[str, float], ScoredSamples]:
        metrics, samples = self.learner.train_on_prompts(prompts, seeds)
        return combine_rank_metrics([metrics]), samples

    def get_weights(self, version: int | None = None) -> PolicyWeights:
        return self.learner.get_weights(version)

    def learner_state(self) -> bytes:
        return self.learner.packed_state()

    def load_learner_state(self, state: dict) -> None:
        self.learner.load_state_dict(state)

    def shutdown(self) -> None:
        pass


def init_ray(address: str, option: str, **kwargs) -> None:
    """ray.init(address=address, ...): `auto` without a running cluster (Ray's ConnectionError, at once) becomes a
    ConfigError naming `option`; a HOST:PORT nothing answers at was refused before (rl.preflight.check_ray_address)."""
    import ray

    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as error:
        hint = ("; if the cluster uses token authentication (`ray start` with RAY_AUTH_MODE=token), set "
                "RAY_AUTH_MODE=token here too" if os.environ.get("RAY_AUTH_MODE", "disabled") != "token" else "")
        raise ConfigError(f"{option}={address}: {error}{hint}") from None


def constructor_user_error(error: BaseException) -> Exception | None:
    """The user error (rl.cli.USER_ERRORS: a model or reward file that does not load) an actor's constructor raised,
    rebuilt from Ray's report: Ray keeps only its text, a traceback whose last `module.Class: message` line is the
    error's, so it would reach the user as a traceback where inline mode gives one line. None for anything else."""
    from ray.exceptions import RayActorError

    from rl.cli import USER_ERRORS, loaded_types

    if not isinstance(error, RayActorError) or not error.actor_init_failed:
        return None
    text, found = str(error), None
    classes = list(loaded_types(USER_ERRORS))
    while classes:  # the user error types and their subclasses (RewardFileError is a RewardError)
        cls = classes.pop()
        classes += cls.__subclasses__()
        at = text.rfind(f"\n{cls.__module__}.{cls.__qualname__}: ")
        if at >= 0 and (found is None or at > found[0]):
            found = (at, cls)
    if found is None:
        return None
    at, cls = found
    message = text[at + len(f"\n{cls.__module__}.{cls.__qualname__}: "):]
    try:
        return cls(message)
    except TypeError:  # a constructor that takes more than a message
        return None


def alive_nodes() -> list[tuple[float, float]]:
    """(CPU, GPU) of each alive node of the connected Ray cluster."""
    import ray

    return [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def fits_a_node(cpus: float, gpus: float) -> bool:
    """Whether one alive node of the connected Ray cluster has `cpus` CPUs and `gpus` GPUs in all: an actor or a
    Tune trial that asks for more than any node has is never scheduled, and Ray waits for it without a word."""
    return bool(place_on_nodes([(cpus, gpus)], alive_nodes()))


SHUTDOWN_GRACE_S = 10.0
"""How long the end of a run waits for the learners to close their process group before killing them."""

PLACEMENT_SEARCH_LIMIT = 20_000
"""Partial placements `place_on_nodes` tries before it gives up deciding (None); a run's few actors need far fewer."""


def place_on_nodes(actors: list[tuple[float, float]], nodes: list[tuple[float, float]]) -> bool | None:
    """Whether every actor (CPU, GPU) can sit on one of the nodes (CPU, GPU) at once: Ray never moves an actor, so a
    layout whose totals fit but whose actors do not pack (two 3-CPU learners and a 2-CPU sampler on two 4-CPU nodes)
    waits for resources that never free. An exhaustive search, largest actors first, a node tried only once among
    nodes with the same room left; None if it has not decided within PLACEMENT_SEARCH_LIMIT tries."""
    actors = sorted(actors, key=lambda a: (a[1], a[0]), reverse=True)
    room = [list(node) for node in nodes]
    tries = 0

    def place(i: int) -> bool | None:
        nonlocal tries
        if i == len(actors):
            return True
        cpus, gpus = actors[i]
        seen = set()
        undecided = False
        for node in room:
            if (node[0], node[1]) in seen or node[0] < cpus - 1e-9 or node[1] < gpus - 1e-9:
                continue
            seen.add((node[0], node[1]))
            tries += 1
            if tries > PLACEMENT_SEARCH_LIMIT:
                return None
            node[0] -= cpus
            node[1] -= gpus
            placed = place(i + 1)
            node[0] += cpus
            node[1] += gpus
            if placed:
                return True
            undecided |= placed is None
        return None if undecided else False

    return place(0)


def _roles(config: TexForceConfig) -> dict[str, tuple[int, float, float]]:
    """role -> (how many, CPUs each, GPUs each) of the run's actors."""
    r = config.resources
    roles = {
        "sampler": (r.num_samplers, r.cpus_per_sampler, r.gpus_per_sampler),
        "reward actor": (r.num_reward_actors, r.cpus_per_reward_actor, r.gpus_per_reward_actor),
        "learner": (r.num_learners, r.cpus_per_learner, r.gpus_per_learner),
    }
    if get_algorithm(config.train.algorithm).samples_in_learner:  # the learner group is the whole topology
        roles = {"learner": roles["learner"]}
    return roles


def resource_shortfall(config: TexForceConfig, nodes: list[tuple[float, float]]) -> list[str]:
    """What `nodes` (CPU, GPU of each) lack to host the run's actors; [] when they fit, or when the placement search
    has not decided (Ray tries then)."""
    roles = _roles(config)
    need = {"CPU": sum(n * c for n, c, _ in roles.values()), "GPU": sum(n * g for n, _, g in roles.values())}
    have = {"CPU": sum(c for c, _ in nodes), "GPU": sum(g for _, g in nodes)}
    lines = [f"{k}: requested {want:g}, the cluster has {have[k]:g}" for k, want in need.items() if want > have[k] + 1e-9]
    lines += [f"one {role} needs {c:g} CPU / {g:g} GPU but no node has that much"
              for role, (_, c, g) in roles.items() if not place_on_nodes([(c, g)], nodes)]
    if lines:
        return lines
    if place_on_nodes([(c, g) for n, c, g in roles.values() for _ in range(n)], nodes) is not False:
        return []
    sizes = ", ".join(f"{c:g} CPU / {g:g} GPU" for c, g in nodes)
    return [f"the actors fit the cluster's totals but not its nodes together (nodes: {sizes})"]


def _insufficient(config: TexForceConfig, lines: list[str]) -> InsufficientResourcesError:
    detail = "; ".join(f"{n} x {role} ({c:g} CPU, {g:g} GPU)" for role, (n, c, g) in _roles(config).items())
    return InsufficientResourcesError(
        "the Ray cluster cannot host this run: " + "; ".join(lines) + f". Requested: {detail}. "
        "Lower resources.num_* or resources.*_per_* in the config, add nodes, or set "
        "resources.resource_wait_s for an autoscaling cluster."
    )


def check_resources(config: TexForceConfig) -> None:
    """Fail fast, naming the shortfall, when the cluster cannot host the requested actors."""
    deadline = time.monotonic() + config.resources.resource_wait_s
    while True:
        lines = resource_shortfall(config, alive_nodes())
        if not lines:
            return
        if time.monotonic() >= deadline:
            raise _insufficient(config, lines)
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def local_gpu_count() -> float:
    """The GPUs a local Ray started here gets, counted as Ray counts them (the GPU vendor's driver, capped by the
    visible devices, e.g. CUDA_VISIBLE_DEVICES); inf when Ray's accelerator module is not where this Ray version
    keeps it, which leaves the count to `check_resources` once Ray has started."""
    try:
        from ray._private import accelerators

        manager = accelerators.get_accelerator_manager_for_resource("GPU")
        count = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
    except (ImportError, AttributeError):
        return math.inf
    return float(count if visible is None else min(count, len(visible)))


def check_fits_this_machine(config: TexForceConfig) -> None:
    """Before a local Ray starts: it gets this machine's CPUs (at most `os.cpu_count()`) and GPUs
    (`local_gpu_count`), so a run that needs more is the same InsufficientResourcesError without Ray's start-up
    lines before it, and before the run directory is made."""
    lines = resource_shortfall(config, [(float(os.cpu_count() or 1), local_gpu_count())])
    if lines:
        raise _insufficient(config, lines)


class ActorsLostError(RuntimeError):
    """Every actor of a role is gone for good: each used up its resources.max_restarts."""


class LearnerFailedError(RuntimeError):
    """A learner rank died; the driver restarts the learner group from the last checkpoint."""


def _actor_info(actor) -> dict:
    """The GCS actor-table entry of `actor` (state, number of restarts)."""
    from ray._private import state

    return state.actors(actor_id=actor._actor_id.hex())


def describe_layout(layout: dict[str, list[str]]) -> str:
    """One line saying which actors share which node, from `RayWorkers.layout` (role -> node id
    of each actor): what a user reads to see how the cluster placed the run."""
    by_node: dict[str, list[str]] = {}
    for role, nodes in layout.items():
        for i, node in enumerate(nodes):
            by_node.setdefault(node, []).append(f"{role} {i}")
    where = "; ".join(f"node {node[:8]}: {', '.join(actors)}" for node, actors in by_node.items())
    return f"actors on {len(by_node)} node{'s' if len(by_node) != 1 else ''}: {where}"


@dataclass
class _Call:
    """One remote call in flight during a rollout: sampling or scoring a shard, or waiting
    for a restarted actor to answer (`revive`)."""

    kind: Literal["sample", "score", "revive"]
    role: Literal["sampler", "reward actor"]
    actor: int
    shard: int = -1
    images: object = None  # the ref to the shard's images, which a score call reads


class _ShardFailures:
    """How many times each shard's sample or score call failed in a way that says something about the shard.

    An actor that dies with its node fails whatever call it holds. Before the driver learns of the
    death, a shard given back after one such failure can go to another actor of the same dead node
    and fail again: that failure says nothing about the shard. So a failure counts against its shard
    when it is the shard's first, or when the actor that failed had answered since the shard's last
    counted failure (it was alive after that one, so it died on this input). A poisoned shard
    still stops the rollout: a restarted actor answers before it gets the shard again, and each
    actor fails it uncounted at most once between two counted failures."""

    def __init__(self):
        self.clock = 0
        self.last_answer: dict[tuple[str, int], int] = {}  # (role, actor) -> clock
        self.last_counted: dict[tuple[str, int], int] = {}  # (kind, shard) -> clock
        self.counts: Counter = Counter()

    def answered(self, role: str, actor: int) -> None:
        self.clock += 1
        self.last_answer[(role, actor)] = self.clock

    def failed(self, kind: str, shard: int, role: str | None = None, actor: int = -1) -> int:
        """Record a failure (role None: not an actor's, such as the shard's images lost with a node,
        which always counts); the shard's count of failures of this kind."""
        self.clock += 1
        key = (kind, shard)
        if role is None or key not in self.last_counted or self.last_answer.get((role, actor), 0) > self.last_counted[key]:
            self.counts[key] += 1
            self.last_counted[key] = self.clock
        return self.counts[key]


class RayWorkers:
    """Samplers, reward actors and L learner ranks as Ray actors (only the learner ranks for a
    gradient learner, which samples and scores itself).

    Weights go out as one `ray.put` per version. Reward scoring of a finished shard overlaps
    with sampling of the next. Faults:
    - a sampler or reward actor that dies is restarted by Ray (resources.max_restarts); its
      work goes back to the queue and it gets no new work until it answers a ping that Ray
      holds until the restart is done, so one death costs one restart, however busy the node;
      a shard that kills its actor again and again stops the rollout (`_ShardFailures`);
    - a learner rank that dies raises LearnerFailedError; `restart_learners` replaces the group.
    Every remote wait has a timeout (resources.call_timeout_s).
    """

    def __init__(self, config: TexForceConfig):
        import ray

        self.config = config
        r = config.resources
        self.timeout = r.call_timeout_s
        check_resources(config)
        sampler_cls = ray.remote(SamplerWorker).options(
            num_cpus=r.cpus_per_sampler, num_gpus=r.gpus_per_sampler, max_restarts=r.max_restarts,
            # merged with the job's runtime env (`ray job submit --runtime-env`)
            runtime_env={"env_vars": {"RAY_max_direct_call_object_size": str(SAMPLER_INLINE_BYTES)}},
        )
        reward_cls = ray.remote(RewardActor).options(
            num_cpus=r.cpus_per_reward_actor, num_gpus=r.gpus_per_reward_actor, max_restarts=r.max_restarts
        )
        rollout_roles = not get_algorithm(config.train.algorithm).samples_in_learner
        self.samplers = [
            sampler_cls.remote(config, num_threads=_threads(r.cpus_per_sampler), low_priority=r.rollout_low_priority)
            for _ in range(r.num_samplers)
        ] if rollout_roles else []
        self.reward_actors = [
            reward_cls.remote(config.reward, device=config.model.device, num_threads=_threads(r.cpus_per_reward_actor),
                              low_priority=r.rollout_low_priority, evaluation_spec=config.evaluation.reward)
            for _ in range(r.num_reward_actors)
        ] if rollout_roles else []
        # surface construction errors (missing model, bad reward files) now, not mid-epoch
        try:
            self.learners = self._start_learners()
            self._get([a.ping.remote() for a in self.samplers + self.reward_actors])
        except Exception as error:
            user_error = constructor_user_error(error)
            if user_error is None:
                raise
            raise user_error from None  # one line, as inline mode gives it
        self.learner_restarts = 0
        log.info(describe_layout(self.layout))

    @property
    def layout(self) -> dict[str, list[str]]:
        """The node id of each actor, by role (read from the GCS: where Ray placed it, or restarted it)."""
        roles = {"sampler": self.samplers, "reward actor": self.reward_actors, "learner": self.learners}
        return {role: [_actor_info(a).get("Address", {}).get("NodeID", "?") for a in actors]
                for role, actors in roles.items() if actors}

    def _start_learners(self) -> list:
        """L learner ranks, joined in one process group when L > 1. Ray does not restart them
        (max_restarts=0): a rank alone cannot rejoin a process group, so the driver replaces all."""
        import ray

        r = self.config.resources
        learner_cls = ray.remote(LearnerWorker).options(num_cpus=r.cpus_per_learner, num_gpus=r.gpus_per_learner)
        learners = [
            learner_cls.remote(self.config, rank=i, world_size=r.num_learners,
                               num_threads=r.learner_threads or _threads(r.cpus_per_learner))
            for i in range(r.num_learners)
        ]
        try:
            if r.num_learners > 1:
                host, port = self._get(learners[0].rendezvous_address.remote())
                # each in turn as it answers: a rank that dies must not leave the others waiting to join it
                self._get_each([learner.init_process_group.remote(host, port) for learner in learners])
            else:
                self._get(learners[0].ping.remote())
        except Exception:
            for learner in learners:
                ray.kill(learner)
            raise
        return learners

    def _get(self, refs):
        import ray

        return ray.get(refs, timeout=self.timeout)

    def _get_each(self, refs: list, on_done: Callable[[int], None] | None = None) -> list:
        """ray.get on `refs`, raising the first failure as soon as it comes back, whatever its position;
        on_done(i) as the i-th comes back."""
        import ray

        position = {ref: i for i, ref in enumerate(refs)}
        pending = refs
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self.timeout)
            if not ready:
                raise TimeoutError(f"an actor did not answer within {self.timeout:g} s (resources.call_timeout_s)")
            ray.get(ready[0])
            if on_done is not None:
                on_done(position[ready[0]])
        return self._get(refs)

    @property
    def restarts(self) -> int:
        """Actor restarts so far: Ray's restarts of samplers and reward actors (read from the
        GCS, so a death is counted once however many calls it failed) plus learner-group restarts."""
        return sum(int(_actor_info(a).get("NumRestarts", 0)) for a in self.samplers + self.reward_actors) + (
            self.learner_restarts * len(self.learners)
        )

    def rollout(
        self, weights: PolicyWeights, prompts: list[str], seeds: list[int], *, start_seeds: list[int] | None = None,
        on_shard_done: Callable[[str, int], None] | None = None, evaluation: bool = False,
    ) -> Rollout:
        """Sample every shard and score it; the work of an actor that died is re-issued. The
        trajectories and images stay in the object store (the Rollout holds their refs).

        on_shard_done(kind, shard) is called as each shard is sampled ("sample") and scored ("score"). A gradient
        learner's held-out evaluation is drawn and scored by the learner ranks (`evaluate_on_learners`).
        """
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayError

        if evaluation and get_algorithm(self.config.train.algorithm).samples_in_learner:
            return self.evaluate_on_learners(prompts, seeds, on_shard_done)
        weights_ref = ray.put(weights)
        shards = _shards(prompts, seeds, start_seeds, self.config.sample.batch_size)
        actors = {"sampler": self.samplers, "reward actor": self.reward_actors}
        to_sample: deque[int] = deque(range(len(shards)))
        to_score: deque[tuple[int, object]] = deque()
        idle_samplers: deque[int] = deque(range(len(self.samplers)))
        scorers = list(range(len(self.reward_actors)))  # in service, round-robin
        lost: dict[str, set[int]] = {"sampler": set(), "reward actor": set()}
        trajectory_refs: dict[int, list[ray.ObjectRef]] = {}
        image_refs: dict[int, ray.ObjectRef] = {}
        images_finite: dict[int, torch.Tensor] = {}  # per shard, from its sample call
        scores: dict[int, RewardScores] = {}
        in_flight: dict[ray.ObjectRef, _Call] = {}
        failures = _ShardFailures()
        max_restarts = self.config.resources.max_restarts
        next_scorer = 0

        def take_out_of_service(role: str, actor: int) -> None:
            """Stop sending work to `actor` until a ping, queued by Ray until the restart is done, answers."""
            if role == "reward actor":
                if actor not in scorers:
                    return  # already being revived: one death, one ping
                scorers.remove(actor)
            ping = actors[role][actor].ping.options(max_task_retries=-1).remote()
            in_flight[ping] = _Call("revive", role, actor)

        while len(scores) < len(shards):
            while to_sample and idle_samplers:
                shard, sampler = to_sample.popleft(), idle_samplers.popleft()
                sampled_ref, images_ref, *sample_refs = self.samplers[sampler].sample.options(
                    num_returns=2 if evaluation else 2 + len(shards[shard][0])
                ).remote(weights_ref, *shards[shard], evaluation=evaluation)
                trajectory_refs[shard] = sample_refs
                in_flight[sampled_ref] = _Call("sample", "sampler", sampler, shard, images_ref)
            while to_score and scorers:
                shard, images_ref = to_score.popleft()
                actor = scorers[next_scorer % len(scorers)]
                next_scorer += 1
                ref = self.reward_actors[actor].score.remote(images_ref, shards[shard][0], evaluation,
                                                             images_finite[shard])
                in_flight[ref] = _Call("score", "reward actor", actor, shard, images_ref)
            for role, group in actors.items():
                if len(lost[role]) == len(group):
                    raise ActorsLostError(
                        f"every {role} died more than resources.max_restarts={max_restarts} times; "
                        "raise resources.max_restarts or find what kills them (memory? see the Ray logs)"
                    )
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=self.timeout)
            if not ready:
                raise TimeoutError(f"no sampler or reward actor answered within {self.timeout:g} s "
                                   "(resources.call_timeout_s)")
            call = in_flight.pop(ready[0])
            try:
                value = ray.get(ready[0])
            except (RayActorError, ActorUnavailableError) as error:
                if call.kind == "revive":  # Ray gave up on it: its restarts are used up
                    lost[call.role].add(call.actor)
                    log.warning("%s %d is gone after %d restarts", call.role, call.actor, max_restarts)
                    continue
                count = failures.failed(call.kind, call.shard, call.role, call.actor)
                if count > max(1, max_restarts):
                    raise ActorsLostError(
                        f"{call.kind} of shard {call.shard} (prompts {shards[call.shard][0]}) failed "
                        f"{count} times: its actor dies on this input"
                    ) from error
                log.warning("%s %d failed on shard %d (%s); waiting for its restart, re-issuing the shard",
                            call.role, call.actor, call.shard, type(error).__name__)
                if call.kind == "sample":
                    to_sample.appendleft(call.shard)
                else:
                    to_score.appendleft((call.shard, call.images))
                take_out_of_service(call.role, call.actor)
                continue
            except RayError as error:
                if call.kind != "score" or not is_lost(error):
                    raise
                # the only copy of the images was in the object store of a sampler's node that died
                count = failures.failed("sample", call.shard)
                if count > max(1, max_restarts):
                    raise ActorsLostError(f"the images of shard {call.shard} were lost with their node "
                                          f"{count} times (resources.max_restarts={max_restarts})") from error
                log.warning("the images of shard %d were lost with the node that held them (%s); sampling the shard "
                            "again", call.shard, type(error).__name__)
                to_sample.appendleft(call.shard)
                continue
            failures.answered(call.role, call.actor)
            if call.kind == "revive":
                (idle_samplers.append if call.role == "sampler" else scorers.append)(call.actor)
            elif call.kind == "sample":
                idle_samplers.append(call.actor)
                image_refs[call.shard] = call.images
                images_finite[call.shard] = value.images_finite
                to_score.append((call.shard, call.images))
            else:
                scores[call.shard] = value
            if on_shard_done is not None and call.kind != "revive":
                on_shard_done(call.kind, call.shard)
        order = range(len(shards))
        return Rollout(list(prompts), RewardScores.cat([scores[i] for i in order]), [len(shards[i][0]) for i in order],
                       [trajectory_refs[i] for i in order], [image_refs[i] for i in order],
                       shard_inputs=shards, weights=weights)

    def evaluate_on_learners(self, prompts: list[str], seeds: list[int],
                             on_shard_done: Callable[[str, int], None] | None = None) -> Rollout:
        """A gradient learner's held-out evaluation: its group has no samplers or reward actors, so shard i is drawn
        and scored by learner rank i % L with the LoRA it holds (the same on every rank); the images stay in the
        object store. A rank that dies meanwhile is a LearnerFailedError, as in training."""
        from ray.exceptions import RayError

        shards = _shards(prompts, seeds, None, self.config.sample.batch_size)
        calls = [self.learners[i % len(self.learners)].evaluate.options(num_returns=2).remote(shard_prompts, shard_seeds)
                 for i, (shard_prompts, shard_seeds, _) in enumerate(shards)]
        score_refs = [score_ref for _, score_ref in calls]
        try:
            scores = self._get_each(score_refs, on_done=None if on_shard_done is None else partial(on_shard_done, "score"))
        except RayError as error:
            dead = self._dead_ranks(score_refs, [i % len(self.learners) for i in range(len(calls))])
            if not dead:
                raise
            raise LearnerFailedError(f"learner rank(s) {sorted(dead)} died during the held-out evaluation "
                                     f"({type(error).__name__})") from error
        return _evaluation_rollout(prompts, shards, [image_ref for image_ref, _ in calls], scores)

    def resample(self, rollout: Rollout, shards: list[int]) -> Rollout:
        """`rollout` with `shards` sampled again (by the samplers alive) from the same prompts, seeds
        and LoRA: the same samples, whose only copy was lost with a node. Their scores are kept."""
        inputs = [rollout.shard_inputs[s] for s in shards]
        again = self.rollout(
            rollout.weights, [p for prompts, _, _ in inputs for p in prompts], [s for _, seeds, _ in inputs for s in seeds],
            start_seeds=None if inputs[0][2] is None else [s for _, _, starts in inputs for s in starts],
        )
        assert again.sizes == [rollout.sizes[s] for s in shards], "a shard's samples must be sampled together again"
        trajectory_shards, image_shards = list(rollout.trajectory_shards), list(rollout.image_shards)
        for i, shard in enumerate(shards):
            trajectory_shards[shard], image_shards[shard] = again.trajectory_shards[i], again.image_shards[i]
        return replace(rollout, trajectory_shards=trajectory_shards, image_shards=image_shards)

    def _learner_call(self, refs):
        """ray.get on learner calls (one per rank in rank order, or rank 0's alone), surfacing the
        first failure as soon as it happens. A dead rank becomes LearnerFailedError; an error with
        every rank alive is a bug and is re-raised.

        A rank that dies takes the others' collective down with it, and their error ("connection
        closed by peer") can come back before Ray knows the rank died: seconds later when its node
        is lost, once the GCS's health checks notice. So on an error the other calls get up to
        RANK_DEATH_GRACE_S to settle (a bug in one rank leaves the others waiting in their
        collective until it times out: it is reported after the grace, not after that timeout).
        """
        from ray.exceptions import RayError

        calls = refs if isinstance(refs, list) else [refs]
        try:
            results = self._get_each(calls)
            return results if isinstance(refs, list) else results[0]
        except RayError as error:
            dead = self._dead_ranks(calls, list(range(len(calls))))  # the i-th call is rank i's
            if isinstance(getattr(error, "cause", None), TrajectoriesLostError):
                raise error.cause from error  # every rank raised it before any step (LearnerWorker.update)
            if not dead:
                raise
            raise LearnerFailedError(f"learner rank(s) {sorted(dead)} died ({type(error).__name__})") from error

    def _dead_ranks(self, calls: list, ranks: list[int]) -> set[int]:
        """After a learner call failed: the ranks that died, once the other calls settled (up to
        RANK_DEATH_GRACE_S; `_learner_call` says why). A rank is dead when the GCS says so, or when its call
        (calls[i] is rank ranks[i]'s) failed because its actor did."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayError

        ray.wait(calls, num_returns=len(calls), timeout=min(self.timeout, RANK_DEATH_GRACE_S))
        dead = {i for i, a in enumerate(self.learners) if _actor_info(a).get("State") == "DEAD"}
        for rank, ref in zip(ranks, calls):
            try:
                ray.get(ref, timeout=0)
            except (RayActorError, ActorUnavailableError):
                dead.add(rank)
            except RayError:
                pass
        return dead

    def restart_learners(self) -> None:
        """Replace every learner rank with a fresh one (the caller loads a checkpoint into them).

        When a node is lost, the GCS declares it dead only after its health checks fail, seconds
        later; until then Ray may place a new rank there, which then dies with the node. Such a
        start is tried again, up to resources.max_restarts times."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        for learner in self.learners:
            ray.kill(learner)
        for attempt in range(self.config.resources.max_restarts + 1):
            try:
                self.learners = self._start_learners()
                break
            except (RayActorError, ActorUnavailableError) as error:
                if attempt == self.config.resources.max_restarts:
                    last = [line.strip() for line in str(error).splitlines() if line.strip()][-1:]
                    raise ActorsLostError(
                        f"a new learner rank died while the group started, {attempt + 1} times "
                        f"(resources.max_restarts={self.config.resources.max_restarts}; last: {''.join(last)})"
                    ) from error
                log.warning("a new learner rank died while the group started (%s); starting it again",
                            type(error).__name__)
        self.learner_restarts += 1
        log.info("learners restarted; %s", describe_layout(self.layout))

    def start_update(self, trajectories: TrajectoryShards | Trajectories, advantages: torch.Tensor) -> list:
        """Send the batch (refs to the samplers' shards: each rank fetches them from the object
        store, not through the driver) to every rank and return at once; the learners train while
        the driver samples the next epoch."""
        import ray

        batch_ref, advantages_ref = ray.put(trajectories), ray.put(advantages)
        return [learner.update.remote(batch_ref, advantages_ref) for learner in self.learners]

    def finish_update(self, pending: list) -> dict[str, float]:
        """The metrics of the update `start_update` sent, over all ranks' rows."""
        return combine_rank_metrics(self._learner_call(pending))

    def update(self, trajectories: TrajectoryShards | Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        return self.finish_update(self.start_update(trajectories, advantages))

    def train_on_prompts(self, prompts: list[str], seeds: list[int]) -> tuple[dict[str, float], ScoredSamples]:
        """Every rank samples, scores and steps on its rows; the metrics over all ranks' rows, all ranks' samples
        in epoch order."""
        results = self._learner_call([learner.train_on_prompts.remote(prompts, seeds) for learner in self.learners])
        metrics = combine_rank_metrics([metrics for metrics, _ in results])
        return metrics, ScoredSamples.cat([samples for _, samples in results])

    def get_weights(self, version: int | None = None) -> PolicyWeights:
        return self._learner_call(self.learners[0].get_weights.remote(version))

    def learner_state(self) -> bytes:
        return self._learner_call(self.learners[0].packed_state.remote())

    def load_learner_state(self, state: dict) -> None:
        import ray

        state_ref = ray.put(state)
        self._learner_call([learner.load_state_dict.remote(state_ref) for learner in self.learners])

    def shutdown(self) -> None:
        """Close the learners' process group, then kill every actor. The close waits SHUTDOWN_GRACE_S at most: it
        queues behind an update in flight (Ctrl-C during one), which a kill cuts short anyway."""
        import ray
        from ray.exceptions import RayError

        try:
            ray.get([learner.shutdown.remote() for learner in self.learners], timeout=SHUTDOWN_GRACE_S)
        except RayError:
            pass  # a dead rank has nothing to shut down; a busy one is killed below
        finally:
            for actor in self.samplers + self.reward_actors + self.learners:
                ray.kill(actor)
