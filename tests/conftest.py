"""Shared fixtures: a tiny Stable Diffusion pipeline built offline once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # test clusters listen on 127.0.0.1 only
# One intra-op thread here and in the subprocesses tests start: with two, a test whose cores are
# shared (a Ray actor, another job) waits at every OpenMP barrier for the descheduled thread
# (measured: a learner test 3.8 s idle, 57 s beside one busy process; 4.8 s / 4.7 s on one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray starts its workers at nice 15: beside two CPU-bound jobs on 2 cores they got ~3.5% of a core
# each and the suite failed (2026-12-03). On a busy CI machine the tests' processes compete as equals.
os.environ.setdefault("RAY_worker_niceness", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _quiet_progress_bars():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> str:
    """A tiny SD pipeline saved with `save_pretrained` (real diffusers layout)."""
    from toyworld.tiny import make_tiny

    return str(make_tiny(tmp_path_factory.mktemp("tiny-sd") / "tiny-sd", seed=0))


@pytest.fixture
def pipe(tiny_sd_dir):
    """A fresh, frozen pipeline loaded from the tiny directory (the user's loading path)."""
    from rl.models import load_pipeline

    return load_pipeline(tiny_sd_dir, device="cpu")


def tiny_config(tiny_sd_dir: str, *overrides: str):
    """The project's config with the tiny model and small sizes, plus `overrides`."""
    from rl.config import load_config

    return load_config(
        None,
        [
            f"model.pretrained={tiny_sd_dir}",
            "model.device=cpu",
            "sample.num_steps=6",
            "sample.batch_size=4",
            "sample.num_batches_per_epoch=1",
            "train.batch_size=2",
            "num_epochs=2",
            "lora.rank=4",
            "lora.alpha=4",
            # SCHED_IDLE rollout roles starve beside other jobs on a busy machine; one test checks the policy
            "resources.rollout_low_priority=false",
            *overrides,
        ],
    )


def perturb_lora(params, scale: float = 0.05, seed: int = 0) -> None:
    """Add seeded noise to LoRA factors: B starts at 0, where A's gradient vanishes and the LoRA is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=generator))


def draw_epoch_prompts(monkeypatch, prompts_of_epoch) -> None:
    """Make the driver's epoch `e` draw the prompts `prompts_of_epoch(e, num_samples)`, with seeds 0..num_samples-1
    (a test that needs a reward to fail on one epoch's prompts)."""
    def epoch_prompts(prompts, *, seed, epoch, num_samples, group_size=1, order="random"):
        return prompts_of_epoch(epoch, num_samples), list(range(num_samples))

    monkeypatch.setattr("actors.driver.epoch_prompts", epoch_prompts)


@pytest.fixture
def second_image_nan(monkeypatch) -> None:
    """Every decoded batch's second image is NaN (black after the samplers' uint8 rounding), as a diverged sample's."""
    import rl.sampling

    decode = rl.sampling.decode_latents

    def decode_with_a_nan_image(vae, latents):
        images = decode(vae, latents)
        images[1] = float("nan")
        return images

    monkeypatch.setattr(rl.sampling, "decode_latents", decode_with_a_nan_image)


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Each matplotlib figure as it is saved (before the plot closes it): what a plot drew, read from its artists
    rather than its pixels."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def keep_and_save(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_and_save)
    return figures


def one_line_error(capsys, code: int) -> str:
    """The single stderr line of a user error (exit code 2, no traceback)."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session (loopback, no dashboard)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest, and steadiest on a shared machine, on one thread (opt in per module)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
