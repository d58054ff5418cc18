"""A driver on a Ray cluster that loses three nodes, as preempted machines.

    python tests/drive_with_node_loss.py '{"NODE_ID": PGID, ...}' section.key=value ...

Runs `actors.driver.train` with the overrides and SIGKILLs the process group of a `ray start`
node (raylet, agents and workers die together) three times:
- after epoch 0 (its checkpoint written), the node of the last learner rank;
- in epoch 1, once the new learner ranks are up, as soon as sampler 1 has sampled shard 1 and
  before the shard is scored, sampler 1's node: the only copy of the shard's images and
  trajectories is lost with it;
- in epoch 1, after the rollout and before the learners fetch the trajectories, the node of
  sampler 0: the only copy of the trajectories of shard 0 is lost with it.
"""
import json
import logging
import os
import signal
import sys
import time

from actors import topology
from actors.driver import train
from rl.config import load_config


def kill_node(node: str, process_groups: dict[str, int]) -> None:
    print(f"killing node {node} at {time.strftime('%H:%M:%S')}", flush=True)
    os.killpg(process_groups[node], signal.SIGKILL)


def kill_a_learner_node(process_groups: dict[str, int]):
    def on_epoch_end(epoch: int, row: dict) -> None:
        if epoch == 0:
            from ray._private import state

            learners = [a for a in state.actors().values()
                        if a["ActorClassName"] == "LearnerWorker" and a["State"] == "ALIVE"]
            kill_node(learners[-1]["Address"]["NodeID"], process_groups)

    return on_epoch_end


def kill_sampler_1_node_once_it_has_sampled_shard_1_in_epoch_1(process_groups: dict[str, int]) -> None:
    rollout = topology.RayWorkers.rollout
    killed = []

    def killing_rollout(self, *args, on_shard_done=None, **kwargs):
        def killing_on_shard_done(kind: str, shard: int) -> None:
            if self.learner_restarts == 1 and kind == "sample" and shard == 1 and not killed:
                killed.append(topology._actor_info(self.samplers[1])["Address"]["NodeID"])
                kill_node(killed[0], process_groups)
            if on_shard_done is not None:
                on_shard_done(kind, shard)

        return rollout(self, *args, on_shard_done=killing_on_shard_done, **kwargs)

    topology.RayWorkers.rollout = killing_rollout


def kill_sampler_0_node_before_the_new_learners_update(process_groups: dict[str, int]) -> None:
    start_update = topology.RayWorkers.start_update
    killed = []

    def killing_start_update(self, trajectories, advantages):
        if self.learner_restarts == 1 and not killed:
            killed.append(topology._actor_info(self.samplers[0])["Address"]["NodeID"])
            kill_node(killed[0], process_groups)
        return start_update(self, trajectories, advantages)

    topology.RayWorkers.start_update = killing_start_update


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    groups = json.loads(sys.argv[1])
    kill_sampler_1_node_once_it_has_sampled_shard_1_in_epoch_1(groups)
    kill_sampler_0_node_before_the_new_learners_update(groups)
    train(load_config(None, sys.argv[2:]), on_epoch_end=kill_a_learner_node(groups))
