"""House rules: Ray lives in actors/ and tune/ only; rl/, rewards/ and toyworld/ import without it;
rl/ holds no toy-world code (only its CLI entry reaches toyworld)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_ray_import_in_rl_or_rewards():
    pattern = re.compile(r"^\s*(import ray|from ray)\b", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("rl", "rewards", "toyworld")
        for path in (ROOT / package).rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert offenders == []


def test_importing_rl_does_not_load_ray():
    code = (
        "import sys, rl.config, rl.ddim, rl.sampling, rl.ppo, rl.advantages, rl.learner, rl.lora, rl.models, "
        "rl.algorithms, rl.gradient, "
        "rl.cli, rewards, toyworld.tiny, toyworld.reader; print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_rl_does_not_import_the_toy_world():
    pattern = re.compile(r"^\s*(import toyworld|from toyworld)\b", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "rl").rglob("*.py")
        if path.name != "cli.py" and pattern.search(path.read_text())
    ]
    assert offenders == []
