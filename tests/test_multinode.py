"""The trainer on a Ray cluster of several nodes on this machine, started with `ray start` as an
operator starts them, losing three nodes mid-run. Each sampler and each learner rank on a node of
its own, so trajectories, images and weights cross object stores and the two ranks all-reduce over
TCP between nodes. A learner node advertises one GPU and no CPU: a Ray resource only
(model.device=cpu; nothing here uses CUDA) that lets Ray place learners there and nothing else.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from ray_nodes import LocalCluster, free_ports, token_env
from safetensors.torch import load_file

from actors.driver import train
from rl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RAY_LAYOUT = ["resources.num_samplers=3", "resources.cpus_per_sampler=1", "resources.cpus_per_reward_actor=0",
              "resources.num_learners=2", "resources.cpus_per_learner=0", "resources.gpus_per_learner=1",
              "resources.learner_threads=1", "resources.rollout_low_priority=false", "resources.call_timeout_s=180",
              "train.batch_size=2"]  # per rank: each optimizer step is the one process's 4 rows


def _overrides(tiny_sd_dir: str, out: Path) -> list[str]:
    return [f"model.pretrained={tiny_sd_dir}", "model.device=cpu", f"output_dir={out}", "num_epochs=2",
            "sample.num_steps=6", "sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=4",
            "train.learning_rate=1e-3", "train.warmup_steps=0", "advantage.mode=batch", "lora.rank=4", "lora.alpha=4"]


def test_the_ports_given_to_a_node_are_distinct_and_not_the_ones_it_was_given_already():
    """Each node's agents get ports chosen here; one port given to two agents stopped `ray start` (seen once)."""
    (head,) = free_ports(1)
    ports = free_ports(64, taken=[head])
    assert len(set(ports)) == 64 and head not in ports


@pytest.fixture
def cluster(tmp_path):
    """A head with no CPU (the driver only), three learner nodes (one spare) and three 1-CPU nodes, a
    sampler (1 CPU) on each, none spare. Task results over 4 KB go to the object store, as a real
    model's images and latents do (the tiny model's images, 12 KB a shard, would come back inline
    under Ray's default 100 KB); the actors' arguments (the config, 2 KB) stay inline."""
    # the GCS declares a silent node dead after 1 s x 3 failed health checks, not Ray's 3 s x 5: the
    # same paths, 10 s sooner (a surviving rank's collective still fails before the rank is reported dead)
    env = dict(token_env(tmp_path), RAY_max_direct_call_object_size="4096", RAY_health_check_period_ms="1000",
               RAY_health_check_failure_threshold="3")
    nodes = LocalCluster(env, ["--num-cpus=0"])
    try:
        for _ in range(3):
            nodes.add_node(["--num-cpus=0", "--num-gpus=1"])
        for _ in range(3):
            nodes.add_node(["--num-cpus=1"])
        yield nodes
    finally:
        nodes.shutdown()


@pytest.fixture(scope="module")
def one_process_run(tiny_sd_dir, tmp_path_factory):
    """The same run in one process with one learner on the whole batch: what the cluster must compute."""
    out = tmp_path_factory.mktemp("inline")
    return train(load_config(None, [*_overrides(tiny_sd_dir, out), "run_name=inline", "resources.mode=inline"]))


def _layouts(log: str) -> list[dict[str, str]]:
    """Each `actors on N nodes: node ID: role i, ...; ...` line of the driver's log, as {actor: node}."""
    layouts = []
    for line in re.findall(r"actors on \d+ nodes?: (.*)", log):
        layouts.append({actor.strip(): node for node, actors in re.findall(r"node (\w+): ([^;]*)", line)
                        for actor in actors.split(",")})
    return layouts


def test_a_run_that_loses_a_learner_node_then_two_sampler_nodes_ends_as_one_process_does(
    cluster, one_process_run, tiny_sd_dir, tmp_path
):
    """The driver on the head. After epoch 0 (its checkpoint written) the node of a learner rank is
    killed: the group is started again on the nodes left and trains epoch 1 from that checkpoint.
    In epoch 1's rollout, once sampler 1 has sampled shard 1 and before the shard is scored, sampler
    1's node is killed: the shard's images are lost (only the samplers' nodes ever held them), its
    scoring fails, and the driver has the shard sampled again. After the rollout and before the new
    ranks fetch the trajectories, sampler 0's node is killed: the only copy of shard 0's trajectories
    is gone (Ray cannot rebuild it). Both ranks step on nothing; the driver has the shard sampled
    again with the same seeds and LoRA and sends the update again. Ray has no room to restart
    samplers 0 and 1: a call to either fails at once, and sampler 2 takes their shards."""
    head = next(iter(cluster.nodes))
    process_groups = {node: process.pid for node, process in cluster.nodes.items()}
    out = tmp_path / "out"
    env = dict(cluster.env, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "drive_with_node_loss.py"), json.dumps(process_groups),
                             *_overrides(tiny_sd_dir, out), "run_name=lost", *RAY_LAYOUT,
                             f"resources.address={cluster.address}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    learner_node, sampler_1_node, sampler_0_node = re.findall(r"killing node (\w+)", result.stdout)
    for node in (learner_node, sampler_1_node, sampler_0_node):
        cluster.nodes.pop(node).wait(timeout=30)
    before, after = _layouts(result.stderr)
    nodes = {role: node for role, node in before.items() if role != "reward actor 0"}
    assert len(set(nodes.values())) == 5 and head[:8] not in nodes.values()  # a node each
    assert learner_node[:8] in {before["learner 0"], before["learner 1"]}
    new_nodes = {after["learner 0"], after["learner 1"]}
    assert len(new_nodes) == 2 and learner_node[:8] not in new_nodes and head[:8] not in new_nodes
    assert (before["sampler 0"], before["sampler 1"]) == (sampler_0_node[:8], sampler_1_node[:8])
    # the first idle samplers get the first shards: shard 0 is sampler 0's, shard 1 sampler 1's
    assert re.search(r"the images of shard 1 were lost with the node that held them "
                     r"\((RayTaskError\()?ObjectReconstructionFailedError\)?\); sampling the shard again", result.stderr)
    assert "the trajectories of shard(s) [0] were lost with the node that held them; sampling them again" in result.stderr
    assert "sampler 0 failed on shard 0 (" in result.stderr  # and the shard went to sampler 2

    rows = pq.read_table(out / "lost" / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["num_samples"] == 8 for r in rows)
    # each rank fetched the 4 rows it trains on, of the 8 (one process: all 8)
    assert all(r["trajectories_fetched"] == 4 for r in rows)
    assert all(r["trajectories_fetched"] == 8 for r in one_process_run.read_metrics())
    assert rows[-1]["actor_restarts"] >= 2  # the two ranks of one group (and samplers 0 and 1, as Ray counts them)
    # the learners recompute the samplers' log-probs on other nodes, the lost shard's too: the same policy
    assert all(r["logprob_mismatch"] < 1e-5 for r in rows)
    reference = one_process_run.read_metrics()
    assert rows[0]["reward_mean"] == reference[0]["reward_mean"]
    # epoch 1 sampled with the LoRA two ranks trained: float summation order only
    assert rows[1]["reward_mean"] == pytest.approx(reference[1]["reward_mean"], abs=1e-6)
    # and it ends on the LoRA of one process without the losses
    a = load_file(str(one_process_run.final_lora / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "lost" / "final_lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # two ranks' all-reduced gradients against one learner's: float summation order only
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=5e-5)
