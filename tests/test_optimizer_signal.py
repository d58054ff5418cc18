import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).parent))

import optimizer_signal  # noqa: E402
from conftest import tiny_config  # noqa: E402


def adamw_state(gradient, steps: int, size: int = 20000, seed: int = 0) -> dict:
    """A learner-shaped state after `steps` AdamW steps on one weight whose gradients `gradient(generator)` draws."""
    weight = torch.nn.Parameter(torch.zeros(size))
    optimizer = torch.optim.AdamW([weight], lr=1e-3, betas=(0.9, 0.999))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        weight.grad = gradient(generator, size)
        optimizer.step()
    return {"lora": {"text_encoder": {"w.lora_A.weight": weight.detach().clone()}, "unet": None},
            "optimizer": optimizer.state_dict()}


def test_pure_noise_reads_at_the_simulated_reference_and_a_steady_gradient_near_one():
    # torch's AdamW on independent noise against the script's own simulation of AdamW's two averages
    for steps in (4, 80):
        state = adamw_state(lambda g, n: torch.randn(n, generator=g) * 3e-5, steps)
        m_hat, v_hat, counted, betas = optimizer_signal.moments(state)
        ratio = optimizer_signal.signal_ratio(m_hat, v_hat)
        median, p90 = optimizer_signal.noise_reference(*betas, counted, seed=1)
        assert (counted, betas) == (steps, (0.9, 0.999))
        assert np.median(ratio) == pytest.approx(median, rel=0.03)
        assert np.quantile(ratio, 0.9) == pytest.approx(p90, rel=0.03)
    # after 80 steps the average of squares has settled: |N(0, s^2)| with s^2 = (1-b1)^2 (1-b1^160) / (1-b1^80)^2 / (1-b1^2)
    s = (0.1**2 * (1 - 0.9**160) / (1 - 0.9**80) ** 2 / (1 - 0.9**2)) ** 0.5
    assert optimizer_signal.noise_reference(0.9, 0.999, 80)[0] == pytest.approx(0.6745 * s, rel=0.02)
    # early, v averages few squares and pure noise reads higher than that
    assert optimizer_signal.noise_reference(0.9, 0.999, 4)[0] > 0.39
    # a gradient that always points the same way (plus a little noise) reads near 1
    state = adamw_state(lambda g, n: 1e-5 * (1 + 0.1 * torch.randn(n, generator=g)), 80)
    assert np.median(optimizer_signal.signal_ratio(*optimizer_signal.moments(state)[:2])) > 0.95


def test_checkpoints_are_read_by_name_in_the_learners_parameter_order(tiny_sd_dir, pipe, tmp_path, capsys):
    from rl.learner import PPOLearner
    from rl.run_dir import RunDirectory, pack_learner_state

    config = tiny_config(tiny_sd_dir, "lora.policy=both", "train.max_grad_norm=1e9")
    learner = PPOLearner(pipe, config)
    owner = {id(p): f"{component}.{name.replace('.default', '')}" for component in ("text_encoder", "unet")
             for name, p in getattr(pipe, component).named_parameters() if "lora_" in name}
    run = RunDirectory(tmp_path / "run")
    for epoch in range(2):
        for index, p in enumerate(learner.params):  # each weight's gradient names its place in the optimizer
            p.grad = torch.full_like(p, float(index + 1))
        learner.optimizer_step()
        folder = run.save_checkpoint(epoch, learner_state=pack_learner_state(learner.state_dict()), driver_state={},
                                     weights=learner.get_weights(), config=config)
    state, _ = RunDirectory.load_checkpoint(folder)
    m_hat, _, steps, _ = optimizer_signal.moments(state)
    assert steps == 2 and len(m_hat) == len(learner.params) and any(n.startswith("unet.") for n in m_hat)
    for index, p in enumerate(learner.params):
        assert torch.allclose(m_hat[owner[id(p)]], torch.full_like(p, float(index + 1)))

    assert optimizer_signal.main([str(run.path), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "optimizer_signal.json").read_text())[0]
    assert [e["steps"] for e in result["per_epoch"]] == [1, 2]
    assert all(e["median"] == pytest.approx(1.0) for e in result["per_epoch"])  # every gradient agreed
    modules = {m["module"]: m for m in result["per_module"]}
    assert len(modules) == len(learner.params) and all(m["moved"] > 0 for m in modules.values())
    assert "| epoch_0001 | 2 | 1.000 |" in capsys.readouterr().out


def test_a_folder_without_checkpoints_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoints/epoch_"):
        optimizer_signal.main([str(tmp_path)])
