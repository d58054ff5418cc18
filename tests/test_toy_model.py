"""The committed toy-world model (models/toy-sd): the same files on every machine, and a model
with room to learn on the held-out colour x shape pairs."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

MODEL = Path(__file__).resolve().parents[1] / "models" / "toy-sd"


def _checksums() -> dict[str, str]:
    lines = (MODEL / "SHA256SUMS").read_text().splitlines()
    return {name.strip(): digest for digest, name in (line.split(maxsplit=1) for line in lines if line.strip())}


def test_every_file_of_the_committed_model_has_its_recorded_sha256():
    recorded = _checksums()
    present = {str(p.relative_to(MODEL)) for p in MODEL.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert present == set(recorded), "every file is listed and every listed file exists"
    for name, digest in recorded.items():
        assert hashlib.sha256((MODEL / name).read_bytes()).hexdigest() == digest, name
    assert any(name.endswith(".safetensors") for name in recorded)


def test_the_toy_model_draws_held_out_pairs_partly_right():
    """Room to learn: on pairs it never saw, some but not all attributes come out right."""
    from toyworld.captions import held_out_combinations, parse_caption, prompts_for
    from toyworld.reader import read_objects
    from rl.models import load_pipeline
    from rl.sampling import images_to_float
    from tune.evaluate import EvalSettings, eval_set, generate

    torch.manual_seed(0)
    pipe = load_pipeline(str(MODEL), device="cpu")
    settings = EvalSettings(num_seeds=2, base_seed=2**31, num_steps=10, guidance_scale=5.0, eta=1.0, batch_size=20)
    prompts, seeds = eval_set(prompts_for(held_out_combinations()), settings)
    read = read_objects(images_to_float(generate(pipe, prompts, seeds, settings))).names()
    named = [parse_caption(p) for p in prompts]
    color = sum(r[0] == n[0] for r, n in zip(read, named)) / len(named)
    shape = sum(r[1] == n[1] for r, n in zip(read, named)) / len(named)
    # measured: colour 0.80, shape 0.35 (chance 0.1 and 0.125); the issue asks for 30-70% of attributes
    assert 0.3 <= (color + shape) / 2 <= 0.7 and color >= 0.5, (color, shape)
