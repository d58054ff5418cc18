"""Does the optimizer follow a signal or walk? AdamW's moments in a run's checkpoints, per epoch and per module.

AdamW keeps, per LoRA weight, m (a decaying average of its gradients, beta1) and v (of their squares, beta2).
Bias-corrected, |m_hat| / sqrt(v_hat) is near 1 where the recent gradients agree, and where they are
independent noise around zero it has the distribution that AdamW's two averages give pure noise after as
many steps (simulated here with the run's betas: median 0.155 and 90th percentile 0.378 for betas 0.9,
0.999 after 80 steps; early on, when v averages few squares, higher: 0.41 after 4 steps). Adam moves each
weight by lr x m_hat / sqrt(v_hat), so where that ratio sits at the noise level every weight moves about as
far as any other whatever its gradient's size: a random walk whose step is set by the learning rate rather
than by the reward (docs/demo.md, "Adam walks every weight").

Prints per run, for every checkpoint: the median and 90th percentile of |m_hat| / sqrt(v_hat) over the
LoRA's weights beside pure noise's; and for the last checkpoint, per LoRA module (A and B apart), the
median gradient scale sqrt(v_hat) and how far its weights moved since the first checkpoint:

    python bench/optimizer_signal.py runs/tiny runs/tiny_s1 --out runs/optimizer_signal

Writes `optimizer_signal.md` (the tables printed) and `optimizer_signal.json` into --out.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rl.run_dir import RunDirectory


@functools.cache  # every checkpoint of a run, and of runs alike, asks for the same few step counts
def noise_reference(beta1: float, beta2: float, steps: int, weights: int = 200_000, seed: int = 0) -> tuple[float, float]:
    """Median and 90th percentile of |m_hat| / sqrt(v_hat) after `steps` AdamW steps on independent
    standard-normal gradients (AdamW's two averages, simulated: exact where v averages few squares)."""
    generator = torch.Generator().manual_seed(seed)
    m = torch.zeros(weights, dtype=torch.float64)
    v = torch.zeros(weights, dtype=torch.float64)
    for _ in range(steps):
        g = torch.randn(weights, generator=generator, dtype=torch.float64)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    ratio = (m / (1 - beta1 ** steps)).abs() / (v / (1 - beta2 ** steps)).sqrt()
    return float(ratio.median()), float(ratio.quantile(0.9))


def learner_states(run: Path) -> list[tuple[str, dict]]:
    """(checkpoint folder name, learner state) of every complete checkpoint of `run`, oldest first."""
    folders = RunDirectory(run).complete_checkpoints()
    if not folders:
        raise SystemExit(f"optimizer_signal.py: error: no checkpoints/epoch_* in {run}; pass a run "
                         "directory written with checkpointing on")
    return [(folder.name, RunDirectory.load_checkpoint(folder)[0]) for folder in folders]


def named_lora(state: dict) -> dict[str, torch.Tensor]:
    """The LoRA weights by name, in the optimizer's parameter order (the learner adds the text encoder's first)."""
    return {f"{component}.{name}": weight for component in ("text_encoder", "unet")
            for name, weight in (state["lora"][component] or {}).items()}


def moments(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, tuple[float, float]]:
    """Per LoRA weight name: (m_hat, v_hat), the AdamW step count and betas of one `learner.pt`."""
    optimizer = state["optimizer"]
    group = optimizer["param_groups"][0]
    beta1, beta2 = group["betas"]
    names = list(named_lora(state))
    if len(names) != len(group["params"]):
        raise ValueError(f"{len(names)} LoRA weights but {len(group['params'])} optimizer parameters")
    m_hat, v_hat, steps = {}, {}, 0
    for name, index in zip(names, group["params"], strict=True):
        slot = optimizer["state"][index]
        steps = int(slot["step"])
        m_hat[name] = slot["exp_avg"].float() / (1 - beta1 ** steps)
        v_hat[name] = slot["exp_avg_sq"].float() / (1 - beta2 ** steps)
    return m_hat, v_hat, steps, (beta1, beta2)


def signal_ratio(m_hat: dict[str, torch.Tensor], v_hat: dict[str, torch.Tensor]) -> np.ndarray:
    """|m_hat| / sqrt(v_hat) of every weight with a gradient, flattened."""
    ratios = [(m_hat[n].abs() / v_hat[n].sqrt()).flatten() for n in m_hat]
    values = torch.cat(ratios).numpy()
    return values[np.isfinite(values)]


def module_of(name: str) -> str:
    """'text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight' -> 'text_encoder ... q_proj B'."""
    stem, _, kind = name.rpartition(".lora_")
    return f"{stem} {kind.split('.')[0]}"


def analyse(run: Path) -> dict:
    states = learner_states(run)
    per_epoch = []
    for checkpoint, state in states:
        m_hat, v_hat, steps, betas = moments(state)
        ratio = signal_ratio(m_hat, v_hat)
        last_v_hat = v_hat  # the per-module table reads the last checkpoint's gradient scale
        noise_median, noise_p90 = noise_reference(*betas, steps)
        per_epoch.append({"checkpoint": checkpoint, "steps": steps, "median": float(np.median(ratio)),
                          "p90": float(np.quantile(ratio, 0.9)), "noise_median": noise_median,
                          "noise_p90": noise_p90})
    start, end = named_lora(states[0][1]), named_lora(states[-1][1])
    modules: dict[str, dict[str, list[np.ndarray]]] = {}
    for name, v in last_v_hat.items():
        row = modules.setdefault(module_of(name), {"scale": [], "moved": []})
        row["scale"].append(v.sqrt().flatten().numpy())
        row["moved"].append((end[name].float() - start[name].float()).abs().flatten().numpy())
    per_module = [{"module": module, "gradient_scale": float(np.median(np.concatenate(row["scale"]))),
                   "moved": float(np.median(np.concatenate(row["moved"])))} for module, row in modules.items()]
    return {"run": str(run), "per_epoch": per_epoch, "per_module": per_module,
            "moved_since": states[0][0], "last": states[-1][0]}


def tables(result: dict) -> str:
    lines = [f"### {result['run']}", "",
             "| checkpoint | AdamW steps | median \\|m_hat\\|/sqrt(v_hat) | 90th percentile | pure noise: median, 90th |",
             "|---|---|---|---|---|"]
    lines += [f"| {e['checkpoint']} | {e['steps']} | {e['median']:.3f} | {e['p90']:.3f} | "
              f"{e['noise_median']:.3f}, {e['noise_p90']:.3f} |" for e in result["per_epoch"]]
    lines += ["", (f"| module ({result['last']}) | median gradient scale sqrt(v_hat) | "
                   f"median \\|change\\| since {result['moved_since']} |"), "|---|---|---|"]
    lines += [f"| {m['module']} | {m['gradient_scale']:.2e} | {m['moved']:.2e} |" for m in result["per_module"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with checkpoints/epoch_*/learner.pt")
    parser.add_argument("--out", type=Path, default=None, help="folder for optimizer_signal.md and .json")
    args = parser.parse_args(argv)
    results = [analyse(run) for run in args.runs]
    text = "\n".join(tables(r) for r in results)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "optimizer_signal.md").write_text(text)
        (args.out / "optimizer_signal.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
