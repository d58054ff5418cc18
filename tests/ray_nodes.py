"""Ray nodes started as an operator starts them (`ray start ... --block`), several on one machine.

Each node is its own raylet, object store and agents, so actors on different nodes talk and move
objects as on a real cluster. Every port is chosen free (a Ray the test session started earlier
holds the agents' fixed defaults), and nodes join one at a time: two raylets starting together
on one host collide on a port (measured: "bind: Address already in use").
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

RAY_BIN = Path(sys.executable).with_name("ray")


def free_ports(n: int, taken: Iterable[int] = ()) -> list[int]:
    """`n` distinct ports free now, none in `taken`. Each socket stays bound until all are chosen: chosen one at a time,
    the OS handed one port out twice (measured: a node's two agents given 53727, and `ray start` refused to start)."""
    taken = set(taken)
    with contextlib.ExitStack() as held:
        ports = []
        while len(ports) < n:
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] not in taken:
                ports.append(s.getsockname()[1])
        return ports


def token_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a token-authenticated cluster (Ray's default for `ray start`) and its drivers."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    # as on a cluster node where this project is installed: `python` is the one with its deps
    env["PATH"] = f"{RAY_BIN.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_node(args: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
    """`ray start --block ARGS` in its own process group (stop it with `stop_node`), its output to `log`."""
    # free ports for the agents every node starts (their defaults are fixed numbers), and for a head's Ray client
    # server (10001 by default: a port another head, or one stopped a moment ago, may hold); none that `args` names
    listen, grpc, runtime_env, metrics, client = free_ports(5, taken=map(int, re.findall(r"port=(\d+)", " ".join(args))))
    ports = [f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]
    if "--head" in args:
        ports.append(f"--ray-client-server-port={client}")
    command = [str(RAY_BIN), "start", "--block", "--disable-usage-stats", *ports, *args]
    if log is None:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                start_new_session=True)
    with open(log, "w") as output:  # the child writes to its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(*nodes: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop each node's whole process group (raylet, agents, its actors' workers), all at once: a node can take
    seconds to stop, and waiting for each in turn added them up."""
    signalled = []
    for node in nodes:
        try:
            os.killpg(node.pid, sig)
            signalled.append(node)
        except ProcessLookupError:  # killed already (kill_node): reap it
            node.wait(timeout=10)
    deadline = time.monotonic() + 10
    for node in signalled:
        try:  # measured: `ray start --block` had not exited after 30 s of SIGTERM; the group is killed next
            node.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=10)


class LocalCluster:
    """A head and worker nodes on this machine; `nodes` maps each node's id to its process."""

    def __init__(self, env: dict[str, str], head_args: list[str], *, timeout_s: float = 120.0):
        # conftest sets it to 0 (a one-node test cluster listens on loopback only), which also makes
        # `ray start --address` refuse to join a head
        self.env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
        self.timeout_s = timeout_s
        self.address = f"127.0.0.1:{free_ports(1)[0]}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.temp_dir = Path(tempfile.mkdtemp(prefix="raymn", dir="/tmp"))  # short: Ray's socket paths are limited
        self._add(["--head", f"--port={self.address.split(':')[1]}", "--node-ip-address=127.0.0.1",
                   "--include-dashboard=false", f"--temp-dir={self.temp_dir}", *head_args])

    def add_node(self, args: list[str]) -> str:
        """Start a worker node and wait until the cluster lists it; returns its node id."""
        return self._add([f"--address={self.address}", "--node-ip-address=127.0.0.1", *args])

    def _add(self, args: list[str]) -> str:
        deadline = time.monotonic() + self.timeout_s
        while True:
            # the node's id chosen here (Ray's own test hook), so no `ray status` process need be polled to learn it:
            # each such poll costs a second of CPU, and polling them every 0.5 s took a core from the starting nodes
            node_id = secrets.token_hex(28)  # a NodeID is 28 bytes
            log = self.temp_dir / f"ray_start_{node_id[:8]}.log"
            node = start_node(args, dict(self.env, RAY_OVERRIDE_NODE_ID_FOR_TESTING=node_id), log)
            while node.poll() is None:
                # printed once the GCS lists the node, with its resources (ray/_private/node.py, ray/scripts/scripts.py)
                if "Ray runtime started." in log.read_text():
                    self.nodes[node_id] = node
                    return node_id
                assert time.monotonic() < deadline, f"a node did not join in {self.timeout_s:g} s"
                time.sleep(0.2)
            # `ray start` gives its raylet a fixed 30 s to register with the GCS (ray/_private/node.py); beside
            # busy cores and six nodes that ran out once (measured): stop what it started and start it again
            output = log.read_text()
            assert "timed out during startup" in output and time.monotonic() < deadline, (
                f"ray start {' '.join(args)} exited: {output[-2000:]}")
            stop_node(node)

    def kill_node(self, node_id: str) -> None:
        """The node dies as a machine does: SIGKILL to its raylet, agents and workers at once."""
        stop_node(self.nodes.pop(node_id), sig=signal.SIGKILL)

    def shutdown(self) -> None:
        """Every node's process group killed at once (a node stopped with SIGTERM took its 10 s to stop)."""
        nodes = list(self.nodes.values())
        self.nodes.clear()
        stop_node(*nodes, sig=signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
