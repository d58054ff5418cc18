"""`ray job submit` against a head started on loopback, as a user submits to a cluster."""
import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray_nodes import RAY_BIN, free_ports, start_node, stop_node, token_env

from actors.topology import SAMPLER_INLINE_BYTES

ROOT = Path(__file__).resolve().parents[1]

# Run as a job: what a sampler actor sees of the job's runtime env, once its own (the inline limit) is merged in
SAMPLER_ENV_PROBE = """
import json, os, sys
import ray
from actors.topology import RayWorkers
from rl.config import load_config

ray.init()
workers = RayWorkers(load_config("configs/tiny.yaml", sys.argv[1:]))
seen = ray.get(workers.samplers[0].__ray_call__.remote(lambda self: [
    os.getcwd(), os.environ.get("TOKENIZERS_PARALLELISM"), os.environ.get("RAY_max_direct_call_object_size")]))
print("SAMPLER_ENV " + json.dumps(seen))
workers.shutdown()
"""


@pytest.fixture
def ray_head(tmp_path):
    """A head of our own (token auth on, dashboard on 127.0.0.1); killed by its process group."""
    env = token_env(tmp_path)
    dashboard_port, gcs_port = free_ports(2)
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = tmp_path / "head.log"  # what a head that exits at start-up said
    head = start_node(["--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}", "--num-cpus=2"], env, log)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([str(RAY_BIN), "job", "list", "--address", address], env=env,
                             capture_output=True, check=False).returncode != 0:
            assert head.poll() is None, f"ray start --head exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the head's job server did not come up in 60 s"
            time.sleep(1)
        # the job server answers before the node's job agent has registered with it; until then
        # a submission fails with "No available agent": wait for a trivial job to be accepted
        while True:
            probe = subprocess.run([str(RAY_BIN), "job", "submit", "--address", address, "--no-wait", "--", "true"],
                                   env=env, capture_output=True, text=True, check=False)
            if probe.returncode == 0:
                break
            assert "No available agent" in probe.stdout + probe.stderr, probe.stdout[-2000:] + probe.stderr[-2000:]
            assert head.poll() is None, f"ray start --head exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline + 240, "the head's job agent did not register in 300 s"
            time.sleep(1)
        yield RAY_BIN, address, env
    finally:
        stop_node(head, sig=signal.SIGKILL)  # with SIGTERM it took its 10 s to stop
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_training_entry(ray_head, tiny_sd_dir, tmp_path):
    ray_bin, address, env = ray_head
    out_dir = tmp_path / "runs"
    result = subprocess.run(
        [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--runtime-env", str(ROOT / "configs" / "runtime_env.yaml"), "--",
         "python", "-m", "rl.train", "--config", "configs/tiny.yaml", f"model.pretrained={tiny_sd_dir}",
         f"output_dir={out_dir}", "run_name=job", "num_epochs=1", "sample.num_batches_per_epoch=1",
         "sample.batch_size=4", "train.batch_size=4", "advantage.group_size=4", "evaluation.num_seeds=1"],
        env=env, capture_output=True, text=True, timeout=400, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    rows = pq.read_table(out_dir / "job" / "metrics.parquet").to_pylist()
    assert len(rows) == 1 and rows[0]["num_samples"] == 4
    assert (out_dir / "job" / "final_lora" / "pytorch_lora_weights.safetensors").exists()

    # the samplers' runtime env (actors.topology.SAMPLER_INLINE_BYTES) is merged with the job's, not put in its
    # place: they run in the uploaded working dir (this checkout is pip-installed here, so imports alone would
    # not show it) with the job's env vars and their own
    probe = tmp_path / "sampler_env_probe.py"
    probe.write_text(SAMPLER_ENV_PROBE)
    result = subprocess.run(
        [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--runtime-env", str(ROOT / "configs" / "runtime_env.yaml"), "--",
         "python", str(probe), f"model.pretrained={tiny_sd_dir}"],
        env=env, capture_output=True, text=True, timeout=400, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("SAMPLER_ENV "))
    cwd, tokenizers_parallelism, inline_limit = json.loads(line.removeprefix("SAMPLER_ENV "))
    assert "working_dir_files" in cwd and Path(cwd) != ROOT
    assert tokenizers_parallelism == "false"  # configs/runtime_env.yaml's
    assert inline_limit == str(SAMPLER_INLINE_BYTES)
