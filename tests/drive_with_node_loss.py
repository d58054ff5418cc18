"""A driver on a Ray cluster that loses a learner's node after epoch 0, as a preempted machine.

    python tests/drive_with_node_loss.py '{"NODE_ID": PGID, ...}' section.key=value ...

Runs `actors.driver.train` with the overrides; after epoch 0 (its checkpoint written) it SIGKILLs
the process group of the `ray start` node that hosts a learner rank: raylet, agents and workers
die together.
"""
import json
import logging
import os
import signal
import sys
import time

from actors.driver import train
from rl.config import load_config


def kill_a_learner_node(process_groups: dict[str, int]):
    def on_epoch_end(epoch: int, row: dict) -> None:
        if epoch != 0:
            return
        from ray._private import state

        learners = [a for a in state.actors().values()
                    if a["ActorClassName"] == "LearnerWorker" and a["State"] == "ALIVE"]
        node = learners[-1]["Address"]["NodeID"]
        print(f"killing node {node} at {time.strftime('%H:%M:%S')}", flush=True)
        os.killpg(process_groups[node], signal.SIGKILL)

    return on_epoch_end


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(load_config(None, sys.argv[2:]), on_epoch_end=kill_a_learner_node(json.loads(sys.argv[1])))
