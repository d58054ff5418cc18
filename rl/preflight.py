"""Everything a training run can check before it creates its run directory or loads a model.

`preflight(config)` fails with one user error (ConfigError, ModelNotFoundError, PromptsError,
a rewards.RewardError) that names the setting and the fix, so a bad run leaves nothing behind
and the same command, corrected, starts cleanly. It reads only small files: configs, the
prompts, safetensors headers, the tokenizer and the scheduler config; no weights, no Ray.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from rl.algorithms import get_algorithm
from rl.config import ConfigError, SampleConfig, TexForceConfig
from rl.lora import check_lora_targets
from rl.models import check_device, check_model, load_tokenizer, vae_scale_factor
from rl.prompts import load_prompts, read_prompt_file, warn_long_prompts, warn_trained_evaluation_prompts

log = logging.getLogger("texforce")

# How long a Ray head's port may take to accept a connection before the address is taken for a wrong one
# (ray.init itself retries a silent address for minutes).
RAY_HEAD_TIMEOUT_S = 10.0


def preflight(config: TexForceConfig, *, resume: str | Path | None = None) -> None:
    """Raise the first user error of `config` (`resume`: the run directory a resumed run goes on in); warn (once)
    about prompts that will be truncated or that the reward reads nothing in."""
    import rewards

    config.validate()
    check_run_location(config, resume)
    check_device(config.model.device, option="model.device", local=config.resources.mode == "inline")
    check_gpu_requests(config)
    if config.resources.mode == "ray":
        check_ray_address(*ray_address(config))
    describe_step_rows(config)
    warn_all_steps_in_warmup(config)
    prompts = load_prompts(config.prompts)
    held_out: list[str] = []
    if config.evaluation.prompts_file is not None:
        held_out = read_prompt_file(config.evaluation.prompts_file, option="evaluation.prompts_file")
        warn_trained_evaluation_prompts(prompts, held_out)
    if get_algorithm(config.train.algorithm).learner == "gradient":
        from rl.gradient import check_differentiable, reward_spec

        check_differentiable(config)
        trained_spec = reward_spec(config)
        if config.train.kl_coef > 0:  # a config written for PPO (configs/tiny.yaml) is often reused
            log.warning("train.kl_coef=%g is PPO's KL penalty; train.algorithm=%s does not use it (its own is "
                        "gradient.kl_coef, %g here)", config.train.kl_coef, config.train.algorithm,
                        config.gradient.kl_coef)
    else:
        trained_spec = config.reward.spec
        if config.gradient.kl_coef > 0:
            log.warning("gradient.kl_coef=%g is the gradient learners' KL regulariser; train.algorithm=%s does not "
                        "use it (its own is train.kl_coef, %g here)", config.gradient.kl_coef,
                        config.train.algorithm, config.train.kl_coef)
    rewards.check_reward(trained_spec, paths=config.reward.paths)
    if config.evaluation.reward is not None:
        try:
            rewards.check_reward(config.evaluation.reward, paths=config.reward.paths)
        except rewards.RewardError as error:
            raise type(error)(f"evaluation.reward: {error}") from error
    # a key none of the run's rewards reads is a misspelling or a file for another run: its reward would not get it
    specs = [trained_spec, config.reward.spec, config.evaluation.reward]
    rewards.check_path_keys(config.reward.paths, list(dict.fromkeys(s for s in specs if s is not None)))
    trained = f"prompts.file={config.prompts.file}" if config.prompts.file else f"prompts.builtin={config.prompts.builtin}"
    check_prompts_are_read(config.reward.spec, prompts, source=trained)
    if held_out:
        check_prompts_are_read(config.evaluation.reward or config.reward.spec, held_out,
                               source=f"evaluation.prompts_file={config.evaluation.prompts_file}",
                               outcome="the held-out evaluation would measure nothing")
        prompts = prompts + held_out
    model_dir = check_model(config.model.pretrained)
    if model_dir is None:
        log.info("model %s is a hub id: its files are checked when it loads", config.model.pretrained)
        return
    check_image_size(config.sample, model_dir)
    check_min_sigma(config, model_dir)
    check_lora_targets(config.lora, model_dir)
    source = config.prompts.file or f"the builtin '{config.prompts.builtin}' set"
    warn_long_prompts(prompts, load_tokenizer(model_dir), source=source)


RAY_WORKING_DIR_COPY = ("runtime_resources", "working_dir_files")
"""Where Ray unpacks a job's `--working-dir` (a `_ray_pkg_<hash>` folder under these, in the Ray session's folder):
the job's driver runs there, and the copy is deleted with the session."""


def ray_working_dir_copy(path: Path) -> Path | None:
    """The Ray working_dir copy `path` lies in (RAY_WORKING_DIR_COPY), None when it is in none."""
    parts = path.parts
    for i in range(len(RAY_WORKING_DIR_COPY), len(parts)):
        if parts[i].startswith("_ray_pkg_") and parts[i - len(RAY_WORKING_DIR_COPY):i] == RAY_WORKING_DIR_COPY:
            return Path(*parts[:i + 1])
    return None


def check_run_location(config: TexForceConfig, resume: str | Path | None = None) -> None:
    """Under `ray job submit --working-dir` the driver runs in Ray's temporary copy of that folder: a relative
    output_dir (or --resume path) would put the run's checkpoints and LoRA in the copy, deleted with the Ray session."""
    copy = ray_working_dir_copy(Path.cwd())
    if copy is None:
        return
    if resume is not None:
        if not Path(resume).is_absolute():
            raise ConfigError(f"--resume {resume} is relative, and this job runs in Ray's temporary copy of its "
                              f"--working-dir ({copy}), deleted with the Ray session: the run would go on in that "
                              "copy; pass the run directory's absolute path (e.g. --resume /shared/runs/tiny)")
        return
    if not Path(config.output_dir).is_absolute():
        raise ConfigError(f"output_dir={config.output_dir} is relative, and this job runs in Ray's temporary copy of "
                          f"its --working-dir ({copy}), deleted with the Ray session with the run's checkpoints and "
                          "LoRA; pass an absolute output_dir on storage that outlives the job (e.g. "
                          "output_dir=/shared/runs)")


def prompt_reader(name: str) -> tuple[Callable[[str], bool], str] | None:
    """For a reward that scores what a prompt names (color_alignment: a colour word; the object rewards: the toy
    world's colour and shape), whether a prompt names any of it, and what that is; None for any other reward."""
    from rewards import color, objects

    if name == color.ColorAlignment.name:
        return (lambda prompt: color.find_color(prompt) is not None), f"a colour word ({', '.join(color.COLORS)})"
    if name.removesuffix(objects.SOFT_SUFFIX) in objects.ATTRIBUTE_REWARDS:
        return (lambda prompt: objects.names_an_attribute(name, prompt)), objects.attribute_words(name)
    return None


def check_prompts_are_read(spec: str, prompts: list[str], *, source: str,
                           outcome: str = "the run would learn nothing") -> None:
    """A prompt-reading reward (`prompt_reader`) scores a prompt that names nothing it reads 0 whatever the image: on
    such prompts only, the run sees a constant reward (zero advantages, no gradient) and learns nothing, or an
    evaluation measures nothing (`outcome` says which). ConfigError when no prompt of `source` names what a reward of
    `spec` reads; a warning with the count when some do not."""
    import rewards

    distinct = list(dict.fromkeys(prompts))
    for name, weight in rewards.parse_spec(spec):
        reader = prompt_reader(name)
        if reader is None or weight == 0:
            continue
        names, words = reader
        unread = [prompt for prompt in distinct if not names(prompt)]
        if len(unread) == len(distinct):
            raise ConfigError(f"{source}: no prompt names what reward {name} reads (e.g. {unread[0][:80]!r}), so it "
                              f"scores every image 0 and {outcome}; write prompts that name "
                              f"{words}, e.g. 'a red ball', or use a reward that reads any prompt")
        if unread:
            log.warning("%d of %d prompts (%s) name nothing reward %s reads, e.g. %r: it scores their images 0 "
                        "whatever they show", len(unread), len(distinct), source, name, unread[0][:80])


def warn_all_steps_in_warmup(config: TexForceConfig) -> None:
    """The learning rate rises from 0 over the warmup: a run (often a short trial) whose optimizer steps all fall in
    it trains at a fraction of train.learning_rate, and a one-step run not at all (its LoRA stays zero)."""
    from rl.learner import optimizer_steps_per_epoch, warmup_length

    total = optimizer_steps_per_epoch(config, config.resources.num_learners) * config.num_epochs
    warmup = warmup_length(config.train, total)
    if warmup >= total:
        log.warning("the run's %d optimizer steps all fall in its learning-rate warmup of %d steps "
                    "(train.warmup_steps, or train.warmup_fraction of the run): the rate rises from 0, the first step "
                    "changes nothing, and it never reaches train.learning_rate=%g; lower the warmup or train longer",
                    total, warmup, config.train.learning_rate)


def describe_step_rows(config: TexForceConfig) -> None:
    """Say how many rows an optimizer step averages when there are several learner ranks: train.batch_size is
    per rank, so a config written for one learner takes N-times larger steps on N (same learning rate). Inline
    runs one learner on the ranks' global minibatch (actors.topology.as_one_learner): the same steps."""
    learners, t = config.resources.num_learners, config.train
    if learners == 1:
        return
    rows = t.batch_size * t.gradient_accumulation_steps
    if config.resources.mode == "inline":
        log.info("resources.mode=inline runs one learner for resources.num_learners=%d ranks: it trains on their "
                 "minibatches, %d x train.batch_size=%d = %d rows in one forward pass, and takes the optimizer steps "
                 "%d Ray ranks take (%d rows each)", learners, learners, t.batch_size, learners * t.batch_size,
                 learners, learners * rows)
        return
    accumulate = f" x train.gradient_accumulation_steps={t.gradient_accumulation_steps}" \
        if t.gradient_accumulation_steps > 1 else ""
    log.info("%d learner ranks x train.batch_size=%d%s: %d rows per optimizer step (train.batch_size is per "
             "rank; divide it by %d for one learner's steps)", learners, t.batch_size, accumulate, learners * rows,
             learners)


def ray_address(config: TexForceConfig) -> tuple[str | None, str]:
    """The Ray cluster a run joins (resources.address, else RAY_ADDRESS; None: it starts a local one) and the
    setting it came from, for the errors that name it."""
    if config.resources.address:
        return config.resources.address, "resources.address"
    return os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS"


def check_ray_address(address: str | None, option: str) -> None:
    """The Ray cluster to join answers at `address` (HOST:PORT or ray://HOST:PORT): a wrong address fails here in
    seconds, naming `option`, where ray.init would retry it for minutes. None, `local` and `auto` are Ray's to
    resolve (`auto` fails at once without a cluster)."""
    if not address or address in ("local", "auto"):
        return
    scheme, sep, rest = address.rpartition("://")
    if sep and scheme != "ray":
        raise ConfigError(f"{option}={address} is a {scheme} URL: Ray joins a cluster at its GCS address HOST:PORT "
                          "(port 6379 unless `ray start --head --port` said otherwise) or at ray://HOST:10001; the "
                          "dashboard's http://HOST:8265 is the address for `ray job submit`")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{option}={address} is not HOST:PORT (e.g. 10.0.0.1:6379), ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_HEAD_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise ConfigError(f"{option}={address}: no Ray head answers there ({reason}); start one there with "
                          f"`ray start --head --port={port}`, or correct the address") from None


def check_gpu_requests(config: TexForceConfig) -> None:
    """A CUDA model.device on Ray needs every role to request GPUs: Ray hides them from an actor that requests none."""
    r = config.resources
    if r.mode != "ray" or not config.model.device.startswith("cuda"):
        return
    for key in ("gpus_per_sampler", "gpus_per_learner", "gpus_per_reward_actor"):
        if getattr(r, key) <= 0:
            raise ConfigError(
                f"model.device={config.model.device} but resources.{key}=0: Ray hides the GPUs from an actor that "
                f"requests none; set resources.{key} (fractions share a GPU) or model.device=cpu"
            )


def check_image_size(sample: SampleConfig, model_dir: Path) -> None:
    """sample.height/width must be multiples of the VAE's downscale factor (latents are whole cells)."""
    factor = vae_scale_factor(model_dir)
    for key, value in (("sample.height", sample.height), ("sample.width", sample.width)):
        if value is not None and value % factor:
            below = value - value % factor
            nearest = " or ".join(str(v) for v in sorted({max(factor, below), below + factor}))
            raise ConfigError(
                f"{key}={value} is not a multiple of the VAE's downscale factor {factor} "
                f"(from {model_dir / 'vae' / 'config.json'}); use {nearest}"
            )


def check_min_sigma(config: TexForceConfig, model_dir: Path) -> None:
    """train.min_sigma and train.max_step_gain must leave a step to train in this model's DDIM
    schedule (the learner's own check)."""
    from diffusers import DDIMScheduler

    from rl.ddim import DDIMSchedule
    from rl.learner import trainable_steps

    scheduler = DDIMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    try:
        schedule = DDIMSchedule.from_scheduler(scheduler, config.sample.num_steps)
    except ValueError as error:  # the scheduler settings the policy log-prob cannot use
        raise ConfigError(f"{model_dir / 'scheduler'}: {error}") from None
    trainable_steps(schedule, config.sample.eta, config.train.min_sigma, max_step_gain=config.train.max_step_gain)
