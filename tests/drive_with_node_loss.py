"""A driver on a Ray cluster that loses a node, as a preempted machine.

    python tests/drive_with_node_loss.py ROLE '{"NODE_ID": PGID, ...}' section.key=value ...

Runs `actors.driver.train` with the overrides and SIGKILLs the process group of a `ray start`
node (raylet, agents and workers die together):
- ROLE learner: after epoch 0 (its checkpoint written), the node of the last learner rank;
- ROLE sampler: in epoch 1, after the rollout and before the learners fetch the trajectories, the
  node of sampler 0: the only copy of the trajectories it sampled is lost with it (its images are
  safe: the driver's wait for them copied them to its node).
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


def kill_sampler_0_node_before_the_second_update(process_groups: dict[str, int]) -> None:
    start_update = topology.RayWorkers.start_update
    updates = []

    def killing_start_update(self, trajectories, advantages):
        updates.append(trajectories)
        if len(updates) == 2:
            kill_node(topology._actor_info(self.samplers[0])["Address"]["NodeID"], process_groups)
        return start_update(self, trajectories, advantages)

    topology.RayWorkers.start_update = killing_start_update


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    role, groups, overrides = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
    if role == "learner":
        train(load_config(None, overrides), on_epoch_end=kill_a_learner_node(groups))
    else:
        kill_sampler_0_node_before_the_second_update(groups)
        train(load_config(None, overrides))
