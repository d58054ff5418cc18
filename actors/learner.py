"""Learner worker: one data-parallel rank of the run's learner (rl.learner.PPOLearner or rl.gradient.GradientLearner)."""
from __future__ import annotations

import socket
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist

from actors.reward import RewardActor, RewardScores
from actors.rollout import TrajectoriesLostError, TrajectoryShards
from actors.sampler import SamplerWorker
from rl.algorithms import get_algorithm
from rl.config import TexForceConfig
from rl.gradient import GradientLearner, ScoredSamples, reward_spec
from rl.learner import PPOLearner
from rl.lora import PolicyWeights
from rl.models import load_pipeline_from_config
from rl.run_dir import pack_learner_state
from rl.sampling import Trajectories


class LearnerWorker:
    """Plain class; one per rank. With world_size > 1, `init_process_group` joins the group
    (gloo on CPU, nccl on GPU) and the learner all-reduces gradients before each step. The
    algorithm's registry entry picks the learner: PPO updates on the samplers' trajectories, a
    gradient learner samples, scores and steps itself (`train_on_prompts`)."""

    def __init__(self, config: TexForceConfig, *, rank: int = 0, world_size: int = 1, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.config, self.rank, self.world_size = config, rank, world_size
        pipe = load_pipeline_from_config(config.model)
        learner_cls = GradientLearner if get_algorithm(config.train.algorithm).samples_in_learner else PPOLearner
        self.learner = learner_cls(pipe, config, world_size=world_size)
        self.evaluator: tuple[SamplerWorker, RewardActor] | None = None  # built at a gradient run's first evaluation

    @staticmethod
    def rendezvous_address() -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the process group."""
        import ray.util

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_process_group(self, host: str, port: int, timeout_s: float = 300.0) -> None:
        backend = "nccl" if torch.cuda.is_available() and self.learner.pipe.unet.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )

    def update(self, trajectories: TrajectoryShards | Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        """PPO on the batch. Refs to the samplers' trajectories are fetched here, from the object store:
        only the rows this rank trains on (`PPOLearner.draw_update`), so W ranks fetch the batch once
        between them, not W times; `trajectories_fetched` counts them (the most any rank fetched, in metrics.parquet).

        If a sample was lost with its node, every rank raises TrajectoriesLostError before any step
        (the ranks agree first: one rank training alone would wait in its all-reduce)."""
        if not isinstance(trajectories, TrajectoryShards):
            return self.learner.update(trajectories, advantages)
        draws = self.learner.draw_update(len(advantages))
        parts, lost = trajectories.fetch_each(draws.rows)
        if self.world_size > 1:
            lost_anywhere = torch.zeros(len(trajectories.shards), device=self.learner.pipe.unet.device)
            lost_anywhere[lost] = 1
            dist.all_reduce(lost_anywhere, op=dist.ReduceOp.MAX)
            lost = torch.nonzero(lost_anywhere).flatten().tolist()
        if lost:
            raise TrajectoriesLostError(lost)
        metrics = self.learner.update(Trajectories.cat(parts), advantages, draws)
        return metrics | {"trajectories_fetched": float(len(parts))}

    def train_on_prompts(self, prompts: list[str], seeds: list[int]) -> tuple[dict[str, float], ScoredSamples]:
        return self.learner.update(prompts, seeds)

    def evaluate(self, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, RewardScores]:
        """A shard of a gradient learner's held-out evaluation (its group has no samplers or reward actors): uint8
        images drawn with this rank's current LoRA as a sampler draws them (`evaluation.eta`), and their scores under
        `evaluation.reward` (reward.spec unless set), without grad; the learner's own state is left as it was."""
        if self.evaluator is None:
            c = self.config
            spec = c.evaluation.reward or c.reward.spec
            trained = self.learner.reward if spec == reward_spec(c) else None  # not a second copy of the same model
            self.evaluator = (SamplerWorker(c, pipe=self.learner.pipe),
                              RewardActor(replace(c.reward, spec=spec), device=c.model.device, reward=trained))
        sampler, reward = self.evaluator
        sampler.version = self.learner.version  # the shared pipeline holds the current LoRA already
        drawn, images = sampler.sample(self.learner.get_weights(), prompts, seeds, evaluation=True)
        return images, reward.score(images, prompts, images_finite=drawn.images_finite)

    def get_weights(self, version: int | None = None) -> PolicyWeights:
        """The current LoRA, or (PPO) the version before it, which async sampling draws with."""
        return self.learner.get_weights() if version is None else self.learner.get_weights(version)

    def packed_state(self) -> bytes:
        """The learner's checkpoint state, packed here (rl.run_dir.pack_learner_state)."""
        return pack_learner_state(self.learner.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state)

    def ping(self) -> int:
        return self.learner.version

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
