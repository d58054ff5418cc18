"""`texforce fuse | eval | tune`: exact LoRA fusion, seeded evaluation, and Ray Tune sweeps over the alphas.

    texforce fuse --lora A.safetensors:0.6 --lora B.safetensors:0.4 --out F.safetensors
    texforce eval --model DIR --lora F.safetensors --prompts P.txt --reward color_alignment --seeds 4 --out eval/
    texforce tune --model DIR --lora A --lora B --prompts P.txt --objective "imagereward:1,aesthetic:0.2" \
        --num-samples 32 --out sweep/

Also `python -m tune.cli tune ...` (no TTY assumed), which is what `ray job submit -- ...` runs.
Heavy imports happen inside the commands; Ray only inside `tune`, after every input is checked:
a bad input is one line and exit code 2 (rl.cli.run_command), before any model loads or Ray starts.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from rl.cli import DefaultsHelpFormatter


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register fuse, eval and tune on the `texforce` parser."""
    fuse = sub.add_parser("fuse", formatter_class=DefaultsHelpFormatter,
                          help="fuse LoRAs exactly: sum_i alpha_i * deltaW_i, written as one LoRA file")
    fuse.add_argument("--lora", action="append", required=True, metavar="PATH[:ALPHA]",
                      help="a LoRA .safetensors file (or directory) and its weight (default 1); repeat per LoRA")
    fuse.add_argument("--out", required=True, type=Path, help="output .safetensors file (or directory)")
    fuse.set_defaults(func=_fuse)

    ev = sub.add_parser("eval", formatter_class=DefaultsHelpFormatter,
                        help="score a (fused) model on a fixed, seeded evaluation set")
    _add_model_args(ev)
    ev.add_argument("--lora", action="append", default=[], metavar="PATH[:ALPHA]",
                    help="LoRA to apply with weight ALPHA (default 1); several are fused exactly; none = base model")
    ev.add_argument("--reward", required=True, help="reward name(s), e.g. 'color_alignment' or 'imagereward,aesthetic'")
    ev.add_argument("--out", type=Path, default=Path("eval"), help="directory for scores.parquet, summary.json, grid.png")
    ev.add_argument("--save-images", action="store_true",
                    help="also write each image to OUT/images/NNNNN.png (the parquet's `image` order) with "
                         "OUT/images/prompts.txt, one prompt per image: `texforce score --images OUT/images --prompts "
                         "OUT/images/prompts.txt --reward ...` scores them with another reward without sampling again")
    ev.set_defaults(func=_eval)

    tu = sub.add_parser("tune", formatter_class=DefaultsHelpFormatter,
                        help="Ray Tune sweep over the fusion weights alpha_i")
    _add_model_args(tu, required=False)  # required unless --resume (checked in _tune)
    tu.add_argument("--lora", action="append", metavar="PATH",
                    help="a LoRA to fuse (repeat); its alpha is searched (required)")
    tu.add_argument("--objective", help="reward spec maximised, e.g. 'imagereward:1,aesthetic:0.2' (required)")
    tu.add_argument("--num-samples", type=int, default=16, help="trials (random / Optuna search)")
    tu.add_argument("--alpha-max", type=float, default=1.0, help="each alpha is searched in [0, ALPHA_MAX]")
    tu.add_argument("--normalize", action="store_true", help="rescale each trial's alphas to sum to 1")
    tu.add_argument("--search", default="auto", choices=["auto", "random", "grid", "optuna"],
                    help="auto: Optuna TPE if installed, else random; grid: 5 points per alpha unless --grid K")
    tu.add_argument("--grid", type=int, default=None, metavar="K",
                    help="grid search with K points per alpha (with --normalize: those that sum to 1); implies "
                         "--search grid")
    tu.add_argument("--search-seed", type=int, default=0, help="seed of the search")
    tu.add_argument("--no-anchors", action="store_true",
                    help="skip the anchor trials (base model, each LoRA alone at ALPHA_MAX, all at ALPHA_MAX)")
    tu.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial declares")
    tu.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs each trial declares (fractions allowed)")
    tu.add_argument("--max-concurrent", type=int, default=0, help="most trials at once (0: resources decide)")
    tu.add_argument("--ray-address", default=None,
                    help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one); 'auto' joins `ray start`")
    tu.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray")
    tu.add_argument("--out", type=Path, default=Path("sweep"),
                    help="directory for results.parquet, best.json, best_lora/, objective.png, and sweep.json (what "
                         "--resume continues)")
    tu.add_argument("--resume", type=Path, default=None, metavar="SWEEP_DIR",
                    help="continue the interrupted sweep in SWEEP_DIR (its --out) with the options it started with: "
                         "finished trials are kept, the others run; only the Ray address and CPU count options may "
                         "be given")
    tu.set_defaults(func=functools.partial(_tune, parser=tu))


def _add_model_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--model", required=required,
                        help="base model: a local diffusers directory" + ("" if required else " (required)"))
    parser.add_argument("--prompts", required=required, type=Path,
                        help="text file, one prompt per line" + ("" if required else " (required)"))
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt (seeds BASE_SEED..BASE_SEED+N-1)")
    parser.add_argument("--base-seed", type=int, default=0, help="first noise seed")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampling call")
    parser.add_argument("--device", default="auto", help="torch device ('auto': CUDA when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype the pipeline is loaded in")
    parser.add_argument("--paths", nargs="*", default=[], metavar="KEY=PATH",
                        help="reward model files, e.g. imagereward=/ckpt/ImageReward.pt (see `texforce rewards list`)")


def _job(args: argparse.Namespace, loras: list[str], reward: str, *, local_device: bool):
    """The FusionJob of `eval` / `tune` from the command line, checked (`_check_job`) before any
    model, reward or Ray is loaded. Raises the user errors `texforce` prints as one line."""
    from rewards.cli import parse_paths
    from rl.config import PromptConfig
    from rl.models import check_model, load_tokenizer
    from rl.preflight import check_prompts_are_read
    from rl.prompts import load_prompts, warn_long_prompts
    from tune.evaluate import EvalSettings
    from tune.lora_io import resolve_lora_path
    from tune.worker import FusionJob

    settings = EvalSettings(
        num_seeds=args.seeds, base_seed=args.base_seed, num_steps=args.steps,
        guidance_scale=args.guidance, eta=args.eta, batch_size=args.batch_size,
    )
    model_dir = check_model(args.model)
    job = FusionJob(
        model=str(model_dir.resolve()) if model_dir is not None else args.model,
        loras=tuple(str(resolve_lora_path(p).resolve()) for p in loras),
        prompts=tuple(load_prompts(PromptConfig(file=str(args.prompts)))),
        reward=reward,
        settings=settings,
        device=args.device,
        dtype=args.dtype,
        reward_paths=tuple(sorted(parse_paths(args.paths).items())),
    )
    _check_job(job, local_device=local_device, check_keys=True)
    check_prompts_are_read(reward, list(job.prompts), source=f"--prompts {args.prompts}",
                           outcome="the evaluation would measure nothing")
    if model_dir is not None:
        warn_long_prompts(list(job.prompts), load_tokenizer(model_dir), source=str(args.prompts))
    return job


def _check_job(job, *, local_device: bool, check_keys: bool) -> None:
    """Raise the user error for a job that cannot run: its device (`local_device`: in this process), model,
    LoRA files and their fit to the model, reward spec, reward file keys (`check_keys`) and
    reward files."""
    from rewards import check_path_keys, check_reward
    from rl.models import check_device, check_model
    from tune.fusion import check_base_model
    from tune.worker import cached_lora

    check_device(job.device, option="--device", local=local_device)
    model_dir = check_model(job.model)
    if model_dir is not None:
        for path in job.loras:
            check_base_model(cached_lora(path), model_dir)
    check_reward(job.reward, paths=dict(job.reward_paths))
    if check_keys:
        check_path_keys(dict(job.reward_paths), [job.reward])


def _check_reward_loads(job) -> None:
    """Build the job's reward on the CPU and drop it, as `texforce eval` builds it before sampling: a reward
    file that exists but does not load would otherwise fail every trial after Ray starts, and leave a sweep
    folder that only `--resume`, with the same files, would take."""
    from rewards import build_reward

    build_reward(job.reward, device="cpu", paths=dict(job.reward_paths) or None)


def _fuse(args: argparse.Namespace) -> int:
    from rl.run_dir import make_output_dir, refuse_existing
    from tune.fusion import fuse, parse_lora_arg
    from tune.lora_io import lora_output_path, read_lora

    items = [parse_lora_arg(text) for text in args.lora]
    alphas = [1.0 if item.alpha is None else item.alpha for item in items]
    refuse_existing([lora_output_path(args.out)])
    fused = fuse([read_lora(item.path) for item in items], alphas)
    make_output_dir(lora_output_path(args.out).parent, "--out")  # after the LoRAs' checks: a bad one leaves no folder
    path = fused.save(args.out)
    ranks = sorted({down.shape[0] for down, _ in fused.modules.values()})
    print(f"fused {len(items)} LoRAs (alphas {alphas}) into {path}: {len(fused.modules)} modules, rank {ranks}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rl.output_lock import claim_output_dir
    from rl.run_dir import make_output_dir, refuse_existing
    from tune.evaluate import output_paths, save_images, write_outputs
    from tune.fusion import parse_lora_arg
    from tune.worker import evaluate_alphas

    items = [parse_lora_arg(text) for text in args.lora]
    alphas = [1.0 if item.alpha is None else item.alpha for item in items]
    images_dir = args.out / "images"
    refuse_existing([*output_paths(args.out).values(), *([images_dir] if args.save_images else [])])
    job = _job(args, [item.path for item in items], args.reward, local_device=True)
    make_output_dir(args.out, "--out")  # after the checks (a bad command leaves no folder), before the sampling
    claim_output_dir(args.out, "--out")
    result = evaluate_alphas(job, alphas, progress=True)
    for name, s in result.summary().items():  # before the writing: a disk that fills up then leaves the scores shown
        print(f"{name:>24s}: {s['mean']:.4f} +- {s['sem']:.4f} (std {s['std']:.4f}, n {s['n']})", flush=True)
    extra = {"model": job.model, "loras": list(job.loras), "alphas": alphas, "reward": job.reward, "eval": vars(job.settings)}
    paths = write_outputs(result, args.out, extra=extra)
    if args.save_images:
        paths["images"] = save_images(result.images, result.prompts, images_dir)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


RESUME_OPTIONS = ("resume", "ray_address", "num_cpus")
"""What `texforce tune --resume` may be given: where the sweep goes on, not what it runs."""


def _tune(args: argparse.Namespace, *, parser: argparse.ArgumentParser) -> int:
    from actors.topology import init_ray
    from rl.config import ConfigError
    from rl.preflight import check_ray_address
    from tune.sweep import can_resume, run_sweep, write_sweep_outputs

    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    local_device = address == "local"  # trials run in this machine's Ray unless a cluster is joined
    if args.resume is not None:
        out, job, settings = _resumed_sweep(args, parser, local_device=local_device)
    else:
        out, job, settings = _new_sweep(args, local_device=local_device)

    import ray

    option = "--ray-address" if args.ray_address else "RAY_ADDRESS"
    check_ray_address(address, option)
    started = not ray.is_initialized()
    if started and address == "local":  # it gets --num-cpus or this machine's CPUs: said before its start-up lines
        cpus = args.num_cpus or os.cpu_count() or 1
        if settings.cpus_per_trial > cpus:
            from actors.topology import InsufficientResourcesError

            raise InsufficientResourcesError(
                f"a trial asks for {settings.cpus_per_trial:g} CPU (--cpus-per-trial) but a local Ray has {cpus:g} "
                "(--num-cpus, else this machine's CPUs); lower it")
    if started:
        init_ray(address, option, num_cpus=args.num_cpus if address == "local" else None, include_dashboard=False)
    try:
        _check_trial_fits(settings, local=local_device)
        sweep = run_sweep(job, settings, out / "ray_results", resume=args.resume is not None)
    except KeyboardInterrupt:  # before any trial finished: nothing to write, and Tune's state to go on from
        if not can_resume(out / "ray_results"):
            raise
        print(f"texforce tune: interrupted before any trial finished; continue with `texforce tune --resume {out}`",
              file=sys.stderr)
        return 130
    finally:
        if started:
            ray.shutdown()
    rows = sweep.rows
    paths = write_sweep_outputs(job, settings, rows, out)
    best = json.loads(paths["best"].read_text())
    print(f"best of {len(rows)} trials: objective {best['objective']:.4f} at alphas {[round(a, 4) for a in best['alphas']]}")
    if best["at_alpha_max"]:
        print(f"note: the best trial has {' and '.join(best['at_alpha_max'])} at the top of the box "
              f"(--alpha-max {settings.alpha_max:g}); the objective may keep rising past it: "
              f"a sweep with a larger --alpha-max tells")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    asked = settings.num_trials(len(job.loras))
    if len(rows) < asked:  # the outputs above are the finished trials'
        line, code = _unfinished_sweep(sweep, asked, out)
        print(line, file=sys.stderr)
        return code
    return 0


def _unfinished_sweep(sweep, asked: int, out: Path) -> tuple[str, int]:
    """The one line a sweep that did not finish every trial ends on (how far it got, why, how to go on) and its exit
    code: 130 after a Ctrl-C (Tune stopped the sweep), else 2 when each failed trial failed on a user error, else 1."""
    finished = len(sweep.rows)
    interrupted = finished + len(sweep.errors) < asked
    if not sweep.errors:
        return (f"texforce tune: interrupted after {finished} of {asked} trials; the outputs are theirs; continue "
                f"with `texforce tune --resume {out}`"), 130
    error = sweep.errors[0]
    first = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")  # Ray's run to many lines
    failed = f"{len(sweep.errors)} failed (the first: {first}; Tune's report: {sweep.reports[0]})"
    if interrupted:
        return (f"texforce tune: interrupted after {finished} of {asked} trials, {failed}; the outputs are the "
                f"finished trials'; continue with `texforce tune --resume {out}`, which runs the failed ones again"), 130
    return (f"texforce tune: {finished} of {asked} trials finished, {failed}; the outputs are the finished trials'; "
            f"`texforce tune --resume {out}` runs the failed ones again"), 2 if sweep.user_errors else 1


def _check_trial_fits(settings, *, local: bool) -> None:
    """A trial that no node can host would leave Tune waiting forever: on this machine's Ray (which does not grow)
    that is a user error; on a cluster, which may be autoscaling, a warning."""
    from actors.topology import InsufficientResourcesError, fits_a_node

    if fits_a_node(settings.cpus_per_trial, settings.gpus_per_trial):
        return
    import ray

    have = ray.cluster_resources()
    message = (f"a trial asks for {settings.cpus_per_trial:g} CPU and {settings.gpus_per_trial:g} GPU "
               f"(--cpus-per-trial, --gpus-per-trial) but no node of the Ray cluster has that much (it has "
               f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU in all)")
    if local:
        raise InsufficientResourcesError(f"{message}; lower them, or give a local Ray more with --num-cpus")
    print(f"texforce tune: warning: {message}; the trials wait until a node that fits joins (an autoscaling "
          "cluster), else stop with Ctrl-C and lower them", file=sys.stderr)


def _new_sweep(args: argparse.Namespace, *, local_device: bool):
    """A new sweep's output directory, job and settings, checked, its record (sweep.json) written."""
    from rl.config import ConfigError
    from rl.output_lock import claim_output_dir
    from rl.run_dir import make_output_dir, refuse_existing
    from tune.sweep import SweepSettings, can_resume, output_paths, record_path, write_sweep_record

    missing = [f"--{name}" for name in ("model", "prompts", "lora", "objective") if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"the following arguments are required: {', '.join(missing)}")
    bad = [text for text in args.lora if _has_alpha(text)]
    if bad:
        raise ConfigError(f"--lora {bad[0]!r}: tune searches the alphas; pass the file without ':ALPHA'")
    if args.grid is not None and args.search not in ("auto", "grid"):
        raise ConfigError(f"--grid {args.grid} is a grid search, --search {args.search} is not; drop one of them")
    settings = SweepSettings(
        num_samples=args.num_samples, alpha_max=args.alpha_max, normalize=args.normalize,
        search="grid" if args.grid is not None else args.search, grid=args.grid if args.grid is not None else 5,
        seed=args.search_seed, anchors=not args.no_anchors, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
    )
    settings.check(len(args.lora))
    out = args.out
    if record_path(out).exists() and can_resume(out / "ray_results"):  # without Tune's state: a failed start
        raise ConfigError(f"{out} holds a sweep already; continue it with `texforce tune --resume {out}`, or "
                          "remove it or choose another --out")
    refuse_existing(list(output_paths(out).values()))
    if args.device.startswith("cuda") and settings.gpus_per_trial == 0:
        raise ConfigError(
            f"--device {args.device} needs --gpus-per-trial > 0: Ray hides the GPUs from a trial that requests none"
        )
    job = _job(args, args.lora, args.objective, local_device=local_device)
    _check_reward_loads(job)
    make_output_dir(out, "--out")
    claim_output_dir(out, "--out")
    write_sweep_record(job, settings, out)
    return out, job, settings


def _resumed_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser, *, local_device: bool):
    """The interrupted sweep's directory, job and settings (its sweep.json), checked again; any option
    besides RESUME_OPTIONS is refused, as the sweep goes on with the options it started with."""
    from rl.config import ConfigError
    from rl.output_lock import claim_output_dir
    from tune.sweep import can_resume, read_sweep_record, record_path

    given = [dest for dest, value in vars(args).items()
             if dest not in (*RESUME_OPTIONS, "command", "func") and value != parser.get_default(dest)]
    if given:
        raise ConfigError(f"--resume continues the sweep with the options it started with "
                          f"({record_path(args.resume)}); drop --{given[0].replace('_', '-')}: only "
                          "--ray-address and --num-cpus go with --resume")
    out = args.resume
    job, settings = read_sweep_record(out)
    claim_output_dir(out, "--resume")
    _check_job(job, local_device=local_device, check_keys=False)  # its trials ran with the paths it recorded
    if not can_resume(out / "ray_results"):
        raise ConfigError(f"--resume {out}: Tune kept no state of this sweep ({out / 'ray_results'}): it stopped "
                          "before its first trial; start it again with the same --out")
    _check_reward_loads(job)
    return out, job, settings


def _has_alpha(text: str) -> bool:
    from rl.config import ConfigError
    from tune.fusion import parse_lora_arg

    try:
        return parse_lora_arg(text).alpha is not None
    except ConfigError:
        return True


def main(argv: list[str] | None = None) -> int:
    """`python -m tune.cli {fuse,eval,tune} ...`, the entry `ray job submit` runs."""
    from rl.cli import CommandLineParser, parse_command_line, run_command

    parser = CommandLineParser(prog="python -m tune.cli", description="LoRA fusion, evaluation and Tune sweeps")
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_command(parse_command_line(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
