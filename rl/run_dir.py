"""The run directory: resolved config, per-epoch metrics (parquet), checkpoints, final LoRA, plots.

Layout:
    config.yaml                     the resolved config
    metrics.parquet                 one row per epoch
    evaluation.parquet              held-out reward before training (epoch -1) and after evaluated epochs
    checkpoints/epoch_NNNN/         lora/ (diffusers safetensors), learner.pt, driver.json
    final_lora/                     pytorch_lora_weights.safetensors
    grids/epoch_NNNN.png            sampled images with prompts and rewards (every `plot_every`-th epoch, the last)
    reward_curve.png                mean reward per epoch (+-1 standard error) and the held-out evaluations
    tensorboard/                    event files

Checkpoints are written to a temporary folder and renamed, so an interrupted save never
leaves a half checkpoint behind; `learner.pt` holds tensors and plain containers only and is
read with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rl.config import ConfigError, TexForceConfig, load_config, save_config
from rl.lora import PolicyWeights, save_lora
from rl.output_lock import claim_output_dir

log = logging.getLogger("texforce")


def pack_learner_state(state: dict) -> bytes:
    """A learner's state as the bytes of its checkpoint file `learner.pt` (torch.save format).

    The learner packs its state where it lives: one bytes object crosses Ray about 5x faster than
    the hundreds of small tensors of an optimizer state, and the driver writes it unopened.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
"""A disk that fills up or turns read-only under a command: it stops with one line saying so (and, for a training
run, how to resume), not a traceback."""


def storage_problem(error: BaseException, where: str | Path) -> str | None:
    """What a full or read-only disk (STORAGE_ERRNOS) did and what to do about it, for a one-line message ("No space
    left on device: runs/x/metrics.parquet; free space there"); None for any other error. `where` names the place when
    the error does not (pyarrow's carries no file name)."""
    if not isinstance(error, OSError) or error.errno not in STORAGE_ERRNOS:
        return None
    fix = "make it writable or write elsewhere" if error.errno == errno.EROFS else "free space there"
    return f"{os.strerror(error.errno)}: {error.filename or where}; {fix}"


def refuse_existing(paths: list[Path]) -> None:
    """Outputs are never overwritten (fuse, eval, tune, score): an existing one is refused before any work."""
    existing = [p for p in paths if p.exists()]
    if existing:
        raise ConfigError(f"{existing[0]} already exists; remove it or choose another --out")


def make_output_dir(path: str | Path, option: str) -> Path:
    """Create the directory `path` (and its parents) and write a scratch file in it, before the work whose
    outputs go there: a path under a file, on a read-only disk or without permission is then a ConfigError
    naming `option`, not a traceback after the sampling or pretraining it would have kept."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"{option}: cannot write to {path} ({reason}); choose a directory this user can write to") \
            from error
    return path


class RunExistsError(FileExistsError):
    """A new run was pointed at a directory that already holds one (a user error)."""


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.parquet"
        self.evaluation_path = self.path / "evaluation.parquet"
        self.config_path = self.path / "config.yaml"
        self.final_lora = self.path / "final_lora"
        self.grids = self.path / "grids"
        self.reward_curve = self.path / "reward_curve.png"
        self.tensorboard = self.path / "tensorboard"

    @classmethod
    def for_config(cls, config: TexForceConfig) -> "RunDirectory":
        """The run directory of a new run of `config`: output_dir/run_name."""
        return cls(Path(config.output_dir) / config.run_name)

    @classmethod
    def create(cls, config: TexForceConfig) -> "RunDirectory":
        """A run directory at output_dir/run_name. A folder that already holds a run's progress
        (metrics or checkpoints) is refused; one left by a run that failed before its first epoch
        ended is reused, so the same command works once the problem is fixed."""
        run = cls.for_config(config)
        run.refuse_if_taken()
        make_output_dir(run.path, "output_dir")
        claim_output_dir(run.path, "output_dir/run_name")
        run.save_config(config)
        return run

    def refuse_if_taken(self) -> None:
        """Raise RunExistsError when this directory already holds a run's progress."""
        if self.has_progress():
            raise RunExistsError(
                f"run directory {self.path} already holds a run; continue it with `--resume {self.path}` "
                "or choose another run_name=..."
            )

    def has_progress(self) -> bool:
        return self.metrics_path.exists() or any(self.checkpoints.glob("epoch_*"))

    def save_config(self, config: TexForceConfig) -> None:
        save_config(config, self.config_path)

    def load_config(self) -> TexForceConfig:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory: no config.yaml")
        return load_config(self.config_path)

    # --- metrics ---------------------------------------------------------------------------

    def read_metrics(self) -> list[dict]:
        return _read_rows(self.metrics_path)

    def append_metrics(self, row: dict) -> list[dict]:
        """Add one epoch's row (rewriting the file atomically); returns all rows."""
        return _append_row(self.metrics_path, row)

    def read_evaluations(self) -> list[dict]:
        return _read_rows(self.evaluation_path)

    def append_evaluation(self, row: dict) -> list[dict]:
        """Add one held-out evaluation (its "epoch" is the last trained epoch, -1 before training)."""
        return _append_row(self.evaluation_path, row)

    # --- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(
        self, epoch: int, *, learner_state: bytes, driver_state: dict, weights: PolicyWeights, config: TexForceConfig
    ) -> Path:
        """learner_state: `pack_learner_state`'s bytes, written as learner.pt."""
        final = self.checkpoints / f"epoch_{epoch:04d}"
        tmp = self.checkpoints / f".tmp_epoch_{epoch:04d}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            save_lora(weights, config.lora, tmp / "lora")
            (tmp / "learner.pt").write_bytes(learner_state)
            (tmp / "driver.json").write_text(json.dumps({"epoch": epoch, **driver_state}))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # half a checkpoint is never read: it would only hold the space
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if config.keep_checkpoints is not None:  # the oldest go only once the new one is complete
            for old in self.complete_checkpoints()[:-config.keep_checkpoints]:
                shutil.rmtree(old)
        return final

    def latest_checkpoint(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def checkpointed_epochs(self) -> int:
        """How many epochs the newest complete checkpoint holds: epoch_NNNN holds NNNN + 1 (0 without one)."""
        latest = self.latest_checkpoint()
        return int(latest.name.removeprefix("epoch_")) + 1 if latest else 0

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint folders whose save finished (driver.json is written last), oldest first."""
        return sorted(p for p in self.checkpoints.glob("epoch_*") if (p / "driver.json").exists())

    def load_latest_checkpoint(self) -> tuple[Path, dict, dict] | None:
        """(folder, learner_state, driver_state) of the newest checkpoint that reads back; a
        damaged one (truncated file, bad JSON) is skipped with a warning naming it."""
        for path in reversed(self.complete_checkpoints()):
            try:
                return (path, *self.load_checkpoint(path))
            except (RuntimeError, ValueError, OSError, EOFError, KeyError) as error:
                log.warning("checkpoint %s cannot be read (%s: %s); falling back to the one before it",
                            path, type(error).__name__, error)
        return None

    @staticmethod
    def load_checkpoint(path: Path) -> tuple[dict, dict]:
        """(learner_state, driver_state) of a checkpoint folder."""
        learner_state = torch.load(path / "learner.pt", map_location="cpu", weights_only=True)
        driver_state = json.loads((path / "driver.json").read_text())
        if not isinstance(driver_state, dict) or "epoch" not in driver_state:
            raise ValueError(f"{path / 'driver.json'} has no epoch")
        return learner_state, driver_state

    def save_final_lora(self, weights: PolicyWeights, config: TexForceConfig) -> Path:
        return save_lora(weights, config.lora, self.final_lora)


def epoch_reward_sem(row: dict) -> float:
    """A metrics row's standard error of its epoch's mean reward: `reward_sem` (over the prompts drawn), or for a
    row written before that column, std / sqrt(n), which counts a prompt's images as independent draws."""
    if row.get("reward_sem") is not None:
        return row["reward_sem"]
    return row["reward_std"] / math.sqrt(max(row["num_samples"], 1))


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


@contextlib.contextmanager
def written_whole(path: str | Path):
    """A temporary name beside `path` (same suffix: writers pick the format by it) that is renamed to `path` once
    the writing has ended: an interrupt or a full disk leaves the earlier file or none, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".partial-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _append_row(path: Path, row: dict) -> list[dict]:
    """Keep the rows of earlier epochs, add `row` (a resumed run replaces what came after), write atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for r in _read_rows(path) if r["epoch"] < row["epoch"]] + [row]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    with written_whole(path) as tmp:
        pq.write_table(table, tmp)
    return rows
