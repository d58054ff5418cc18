"""A Ray Tune sweep over the fusion weights alpha_i of N LoRAs.

One trial: alphas -> exact fused LoRA -> cached pipeline -> the fixed seeded eval set ->
objective = sum_k w_k * mean(reward_k) (`tune.worker.evaluate_alphas`). Search: random over
[0, alpha_max]^N (seeded), a K-point grid per alpha, or Optuna's TPE when `optuna` is
installed. Ray is imported inside the functions that run Tune, so `import tune.sweep` is cheap.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rl.cli import USER_ERRORS, loaded_types
from rl.config import ConfigError
from tune.evaluate import EvalSettings
from tune.lora_io import file_sha256
from tune.worker import LOADS, FusionJob, evaluate_alphas

SEARCHES = ("auto", "random", "grid", "optuna")


@dataclass(frozen=True)
class SweepSettings:
    """How the alphas are searched and how trials are placed."""

    num_samples: int = 16
    """Trials for random / Optuna search (a grid runs K^N trials instead)."""
    alpha_max: float = 1.0
    """Each alpha_i is searched in [0, alpha_max]."""
    normalize: bool = False
    """Rescale each trial's alphas to sum to 1 (all zero -> equal weights)."""
    search: str = "auto"
    """"auto" (Optuna TPE if installed, else random), "random", "grid", "optuna"."""
    grid: int = 5
    """Grid points per alpha when search is "grid" (linspace(0, alpha_max, grid); with normalize, the points
    i/(grid-1) that sum to 1: `simplex_grid`)."""
    seed: int = 0
    """Seed of the search (random draws, TPE)."""
    cpus_per_trial: float = 1.0
    """CPUs each trial declares."""
    gpus_per_trial: float = 0.0
    """GPUs each trial declares (fractions share one GPU)."""
    max_concurrent: int = 0
    """Most trials at once; 0 lets the declared resources decide."""
    anchors: bool = True
    """Random/Optuna search first tries the box's anchor points (`anchor_points`)."""

    def check(self, num_loras: int) -> str:
        """Raise ConfigError (naming the `texforce tune` option) for a setting Tune cannot run;
        returns the resolved search. Called before Ray starts."""
        checks = [
            (num_loras >= 1, "a sweep needs at least one --lora"),
            (self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}"),
            (0 < self.alpha_max < float("inf"), f"--alpha-max must be a positive number, got {self.alpha_max}"),
            (self.search != "grid" or self.grid >= 2, f"--grid needs at least 2 points per alpha, got {self.grid}"),
            (self.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}"),
            (self.gpus_per_trial >= 0, f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}"),
            (self.max_concurrent >= 0,
             f"--max-concurrent must be >= 0 (0: resources decide), got {self.max_concurrent}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return resolve_search(self.search)

    def num_trials(self, num_loras: int) -> int:
        """How many trials the sweep runs: K^N on a grid (with normalize, the grid's points on the simplex),
        else num_samples."""
        if self.search != "grid":
            return self.num_samples
        if self.normalize:
            return math.comb(self.grid - 1 + num_loras - 1, num_loras - 1)
        return self.grid ** num_loras


def alpha_names(n: int) -> list[str]:
    return [f"alpha_{i + 1}" for i in range(n)]


def config_alphas(config: dict, n: int, *, normalize: bool) -> list[float]:
    """The alphas a trial evaluates: the sampled values, rescaled to sum 1 when `normalize`."""
    raw = [float(config[name]) for name in alpha_names(n)]
    if not normalize:
        return raw
    total = sum(raw)
    return [a / total for a in raw] if total > 0 else [1.0 / n] * n


def anchor_points(n: int, alpha_max: float, *, normalize: bool = False) -> list[dict[str, float]]:
    """The base model, each LoRA alone at alpha_max, all at alpha_max (for N = 2: the four corners).

    An unhelpful LoRA's best alpha is 0, a point random draws never hit; trying the corners
    first makes "use only LoRA i" and "use all of them" candidates in every sweep. With `normalize` the alphas
    sum to 1, so the base model is not a candidate (all zeros would be all equal, as all at alpha_max are).
    """
    names = alpha_names(n)
    points = [] if normalize else [dict.fromkeys(names, 0.0)]
    points += [{name: (alpha_max if j == i else 0.0) for j, name in enumerate(names)} for i in range(n)]
    if n > 1:
        points.append(dict.fromkeys(names, alpha_max))
    return points


def simplex_grid(n: int, k: int) -> list[dict[str, float]]:
    """The grid a normalized sweep runs: alphas i/(k-1) that sum to 1. Normalizing the K^N box grid instead
    evaluates each direction several times ((1, 1), (0.5, 0.5) and (0, 0) are all (0.5, 0.5))."""
    steps = k - 1
    names = alpha_names(n)
    return [{name: i / steps for name, i in zip(names, point)}
            for point in itertools.product(range(k), repeat=n) if sum(point) == steps]


def alphas_at_alpha_max(alphas: list[float], settings: SweepSettings) -> list[str]:
    """The names of the alphas within 5% of alpha_max: where the best sits on the box's top face, the
    objective may keep rising past it, and only a sweep over a larger box can tell (never with normalize)."""
    if settings.normalize:
        return []
    return [name for name, a in zip(alpha_names(len(alphas)), alphas) if a >= 0.95 * settings.alpha_max]


def resolve_search(search: str) -> str:
    """"auto" -> "optuna" when importable, else "random"; "optuna" without the package is an error."""
    if search not in SEARCHES:
        raise ConfigError(f"unknown search {search!r}; choose one of {', '.join(SEARCHES)}")
    try:
        import optuna  # noqa: F401

        has_optuna = True
    except ImportError:
        has_optuna = False
    if search == "optuna" and not has_optuna:
        raise ConfigError("--search optuna needs the optuna package (pip install optuna); or use --search random")
    if search == "auto":
        return "optuna" if has_optuna else "random"
    return search


def trial_metrics(job: FusionJob, alphas: list[float]) -> dict[str, float]:
    """Evaluate one alpha vector: objective, its standard error, each reward's mean, the alphas used."""
    result = evaluate_alphas(job, alphas)
    summary = result.summary()
    metrics = {f"used_{name}": a for name, a in zip(alpha_names(len(alphas)), alphas)}
    metrics["objective"] = summary["objective"]["mean"]
    metrics["objective_sem"] = summary["objective"]["sem"]
    metrics.update({f"reward/{name}": s["mean"] for name, s in summary.items() if name != "objective"})
    return metrics


def _trial(config: dict, *, job: FusionJob, normalize: bool) -> None:
    """The Tune function trainable: one report per trial."""
    from ray import tune as ray_tune

    alphas = config_alphas(config, len(job.loras), normalize=normalize)
    metrics = trial_metrics(job, alphas)
    metrics.update({"worker_pid": os.getpid(), "pipeline_loads": LOADS["pipeline"], "reward_loads": LOADS["reward"]})
    ray_tune.report(metrics)


class _WithoutTunesResumeHint(logging.Filter):
    """Drops Tune's "Resume experiment with: Tuner.restore(...)" after a Ctrl-C: that is its Python API's way;
    `texforce tune` says its own (`--resume OUT`), which also writes the finished trials' outputs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with" not in record.getMessage()


def _search_space(settings: SweepSettings, n: int):
    """Tune's param space, search algorithm and num_samples for `settings`' search over n alphas."""
    from ray import tune as ray_tune
    from ray.tune.search import BasicVariantGenerator

    search = settings.check(n)
    names = alpha_names(n)
    if search == "grid" and settings.normalize:
        points = simplex_grid(n, settings.grid)  # given in full, so the uniform space is never drawn from
        space = {name: ray_tune.uniform(0.0, 1.0) for name in names}
        return space, BasicVariantGenerator(points_to_evaluate=points, max_concurrent=settings.max_concurrent), len(points)
    if search == "grid":
        values = [float(v) for v in np.linspace(0.0, settings.alpha_max, settings.grid)]
        space = {name: ray_tune.grid_search(values) for name in names}
        return space, BasicVariantGenerator(max_concurrent=settings.max_concurrent), 1
    space = {name: ray_tune.uniform(0.0, settings.alpha_max) for name in names}
    anchors = (anchor_points(n, settings.alpha_max, normalize=settings.normalize)[: settings.num_samples]
               if settings.anchors else None)
    if search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric="objective", mode="max", seed=settings.seed, points_to_evaluate=anchors)
        if settings.max_concurrent:
            search_alg = ConcurrencyLimiter(search_alg, max_concurrent=settings.max_concurrent)
    else:
        search_alg = BasicVariantGenerator(
            points_to_evaluate=anchors, random_state=settings.seed, max_concurrent=settings.max_concurrent
        )
    return space, search_alg, settings.num_samples


def _tune_state(storage: str | Path) -> Path:
    """Where Tune keeps the sweep's state (its experiment directory under `storage`)."""
    return Path(storage).resolve() / "fusion_sweep"


def can_resume(storage: str | Path) -> bool:
    """Whether Tune left a sweep's state under `storage` that `run_sweep(..., resume=True)` can continue."""
    from ray import tune as ray_tune

    return ray_tune.Tuner.can_restore(str(_tune_state(storage)))  # Tune's tuner.pkl is there


@dataclass
class SweepResult:
    """What a sweep found: one row per finished trial, best first, and the errors of the trials that failed
    without an objective (a worker killed for memory, a node lost, a file missing on one node). Tune keeps the
    failed trials' state: a resume runs them again."""

    rows: list[dict]
    errors: list[BaseException] = field(default_factory=list)
    """Each failed trial's own error (Ray's wrapper removed), in Tune's trial order."""
    reports: list[str] = field(default_factory=list)
    """Where Tune wrote each failed trial's error and traceback (its `error.txt`)."""

    @property
    def user_errors(self) -> bool:
        """Every failure is a user error (rl.cli.USER_ERRORS): the user fixes it, then resumes."""
        return bool(self.errors) and all(isinstance(e, loaded_types(USER_ERRORS)) for e in self.errors)


def run_sweep(job: FusionJob, settings: SweepSettings, storage: str | Path, *, resume: bool = False) -> SweepResult:
    """Run the Tune sweep (Ray must be initialised). `resume` continues the sweep whose Tune state is under
    `storage` (`can_resume`): its finished trials are kept, those cut short or failed run again, and the search
    goes on from where it stopped.

    Trials that failed beside finished ones are returned in the result, so that the finished ones' outputs are
    written. When every trial failed, they raise their user error's type when each failed with one
    (rl.cli.USER_ERRORS), else RuntimeError, after removing Tune's state, so that a corrected command can start
    the sweep again in the same place (its resume would repeat the failure)."""
    from ray import tune as ray_tune

    n = len(job.loras)
    names = alpha_names(n)
    state = _tune_state(storage)
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(_trial, job=job, normalize=settings.normalize),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    if resume:
        tuner = ray_tune.Tuner.restore(str(state), trainable, resume_unfinished=True, restart_errored=True)
    else:
        space, search_alg, num_samples = _search_space(settings, n)
        tuner = ray_tune.Tuner(
            trainable,
            param_space=space,
            tune_config=ray_tune.TuneConfig(
                metric="objective", mode="max", search_alg=search_alg, num_samples=num_samples, reuse_actors=True
            ),
            run_config=ray_tune.RunConfig(
                name=state.name,
                storage_path=str(state.parent),
                verbose=0,
                callbacks=[_one_line_per_trial(names, settings.num_trials(n))],
            ),
        )
    # Tune's console engine prints a configuration box and a TensorBoard path in Ray's temporary session folder even
    # at verbose=0; its legacy engine prints nothing there, leaving `_one_line_per_trial`. A user's own setting wins.
    quiet = "RAY_AIR_NEW_OUTPUT" not in os.environ
    if quiet:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_log, no_hint = logging.getLogger("ray.tune.tune"), _WithoutTunesResumeHint()
    tune_log.addFilter(no_hint)
    try:
        grid = tuner.fit()  # on Ctrl-C Tune stops the trials and returns; those cut short have no objective
    finally:
        tune_log.removeFilter(no_hint)
        if quiet:
            del os.environ["RAY_AIR_NEW_OUTPUT"]
    # a trial whose worker died after it reported has its objective and an error: it finished
    finished = [r for r in grid if "objective" in r.metrics]
    failed = [r for r in grid if r.error is not None and "objective" not in r.metrics]
    causes = [getattr(r.error, "cause", None) or r.error for r in failed]  # the trial's own error, unwrapped
    if failed and not finished:  # nothing to keep: without Tune's state the same --out starts again
        shutil.rmtree(state, ignore_errors=True)
        if SweepResult([], causes).user_errors:  # one line, exit code 2
            raise type(causes[0])(f"{len(failed)} of {len(grid)} trials failed; first error: {causes[0]}")
        raise RuntimeError(f"{len(failed)} of {len(grid)} trials failed; first error: {failed[0].error}")
    if not finished:
        raise KeyboardInterrupt  # the user's Ctrl-C, which Tune caught, before any trial finished
    rows = []
    for trial in finished:
        m = trial.metrics
        row = {"trial_id": m.get("trial_id", "")}
        row.update({name: float(m[f"used_{name}"]) for name in names})
        row.update({name + "_sampled": float(trial.config[name]) for name in names})
        row.update({k: float(v) for k, v in m.items() if k == "objective" or k.startswith(("objective_", "reward/"))})
        row.update({k: int(m[k]) for k in ("worker_pid", "pipeline_loads", "reward_loads")})
        rows.append(row)
    return SweepResult(best_first(rows), causes, [str(Path(r.path) / "error.txt") for r in failed])


def best_first(rows: list[dict]) -> list[dict]:
    """Trial rows by objective, highest first; a NaN objective (a non-finite score in its evaluation set) last:
    compared as a number it would leave the order undefined, and a worse trial first. Ties go by trial id, so the
    best of a sweep does not depend on the order Tune returned its trials in (a resume returns them in another)."""
    return sorted(rows, key=lambda r: (bool(np.isnan(r["objective"])), -r["objective"], r.get("trial_id", "")))


def _one_line_per_trial(names: list[str], total: int):
    """A Tune callback printing `trial   3/16  alpha_1=0.520 alpha_2=0.100  objective=0.46990` (no TTY needed).

    It counts the results it prints: counting the trials Tune has marked ended gave two trials one number when
    both reported before either was marked. A resumed sweep counts on from the trials it kept."""
    from ray.tune import Callback

    class _Printer(Callback):
        def __init__(self):
            self.shown: int | None = None

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.shown is None:  # this session's first result: the trials ended before it are a resumed sweep's
                self.shown = sum(t.status == t.TERMINATED for t in trials)
            self.shown += 1
            alphas = " ".join(f"{name}={result[f'used_{name}']:.3f}" for name in names)
            print(f"trial {self.shown:3d}/{total}  {alphas}  objective={result['objective']:.5f}", flush=True)

    return _Printer()


def record_path(out_dir: str | Path) -> Path:
    """The sweep's record in its output directory (`write_sweep_record`)."""
    return Path(out_dir) / "sweep.json"


def write_sweep_record(job: FusionJob, settings: SweepSettings, out_dir: str | Path) -> Path:
    """Keep what `texforce tune --resume` continues with: the job (its prompts inline), the search
    settings, and the LoRA files' sha256 (a LoRA changed since cannot join the sweep's trials)."""
    path = record_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"job": asdict(job), "settings": asdict(settings), "lora_sha256": [file_sha256(p) for p in job.loras]}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_sweep_record(out_dir: str | Path) -> tuple[FusionJob, SweepSettings]:
    """The job and settings a sweep started with; ConfigError when `out_dir` holds no sweep or one of
    its LoRA files has changed since it started."""
    path = record_path(out_dir)
    if not path.is_file():
        raise ConfigError(f"--resume {out_dir}: no sweep to resume there (no {path.name}); pass the --out "
                          "directory of a `texforce tune` run")
    try:
        record = json.loads(path.read_text())
        stored = record["job"]
        job = FusionJob(**{**stored, "loras": tuple(stored["loras"]), "prompts": tuple(stored["prompts"]),
                           "settings": EvalSettings(**stored["settings"]),
                           "reward_paths": tuple(tuple(pair) for pair in stored["reward_paths"])})
        settings = SweepSettings(**record["settings"])
        digests = list(record["lora_sha256"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"--resume {out_dir}: {path} is not a sweep record ({error})") from None
    for lora, digest in zip(job.loras, digests):
        if not Path(lora).is_file():
            raise ConfigError(f"--resume {out_dir}: the sweep's LoRA {lora} is gone; put it back to resume")
        if file_sha256(lora) != digest:
            raise ConfigError(f"--resume {out_dir}: the sweep's LoRA {lora} has changed since the sweep started; "
                              "its finished trials scored the old one: start a new sweep")
    return job, settings


def output_paths(out_dir: str | Path) -> dict[str, Path]:
    """What `write_sweep_outputs` writes into `out_dir`."""
    out_dir = Path(out_dir)
    return {
        "results": out_dir / "results.parquet",
        "best": out_dir / "best.json",
        "best_lora": out_dir / "best_lora",
        "plot": out_dir / "objective.png",
    }


def write_sweep_outputs(job: FusionJob, settings: SweepSettings, rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """results.parquet, best.json, best_lora/pytorch_lora_weights.safetensors, objective.png."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tune.fusion import fuse_files
    from tune.plots import plot_objective

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = alpha_names(len(job.loras))
    paths = output_paths(out_dir)
    pq.write_table(pa.Table.from_pylist(rows), paths["results"])
    best = rows[0]
    alphas = [best[name] for name in names]
    paths["best_lora"] = fuse_files(job.loras, alphas).save(paths["best_lora"])
    record = {
        "objective": best["objective"],
        "objective_sem": best["objective_sem"],
        "objective_spec": job.reward,
        "alphas": alphas,
        "loras": list(job.loras),
        "rewards": {k.removeprefix("reward/"): v for k, v in best.items() if k.startswith("reward/")},
        "fused_lora": str(paths["best_lora"]),
        "num_trials": len(rows),
        "search": resolve_search(settings.search),
        "alpha_max": settings.alpha_max,
        "at_alpha_max": alphas_at_alpha_max(alphas, settings),
        "normalize": settings.normalize,
        "eval": vars(job.settings) | {"num_prompts": len(job.prompts)},
    }
    paths["best"].write_text(json.dumps(record, indent=2) + "\n")
    points = np.array([[r[name] for name in names] for r in rows])
    plot_objective(points, np.array([r["objective"] for r in rows]), paths["plot"], names=names, title=job.reward)
    return paths
