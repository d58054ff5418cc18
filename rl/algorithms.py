"""The one registry of training algorithms: `train.algorithm` names an entry here.

An entry says what the driver's loop needs for it (samplers, reward actors and advantages for
PPO; nothing but the learner group for the gradient learners, which sample, score and step in
one differentiable pass) and, for a gradient learner, how it picks the steps the gradient
flows through. The learners read these fields; nothing else dispatches on the name.
Importable without torch (the config validates against it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class UnknownAlgorithmError(ValueError):
    """A name that is not registered; the message lists the valid ones."""


@dataclass(frozen=True)
class Algorithm:
    """One registered algorithm.

    learner: "ppo" (policy gradient on stored trajectories) or "gradient" (backpropagation
        of a differentiable reward through the sampler).
    truncation: which steps the gradient flows through (gradient learners): "all" (DRaFT),
        "fixed" (the last `gradient.truncation_k`), "fraction" (the last round(fraction x T),
        `gradient.textcraftor_fraction`, TextCraftor), "random" (the last K, K drawn per minibatch,
        AlignProp), "stop" (one step at a random stop point, scored on its predicted x0, ReFL),
        "copies" (none of the loop's; one step of each of n re-noised copies of x_0, DRaFT-LV).
    original_encoder_early: TextCraftor: the steps before the last K use the base text encoder.
    """

    name: str
    description: str
    learner: Literal["ppo", "gradient"]
    truncation: Literal["none", "all", "fixed", "fraction", "random", "stop", "copies"] = "none"
    original_encoder_early: bool = False

    @property
    def samples_in_learner(self) -> bool:
        """True when the learner group samples and scores itself (no samplers, reward actors or advantages)."""
        return self.learner == "gradient"


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> None:
    if algorithm.name in _REGISTRY:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    _REGISTRY[algorithm.name] = algorithm


def get_algorithm(name: str) -> Algorithm:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownAlgorithmError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(_REGISTRY)}") from None


def algorithm_names() -> list[str]:
    return list(_REGISTRY)


for _entry in (
    Algorithm("ppo", "TexForce / DDPO: clipped PPO on per-step DDIM log-probs (eta > 0)", "ppo"),
    Algorithm("draft", "DRaFT: backpropagate the reward through every sampling step", "gradient", "all"),
    Algorithm("draft_k", "DRaFT-K: backpropagate through the last gradient.truncation_k steps only", "gradient", "fixed"),
    Algorithm("draft_lv", "DRaFT-LV: x_0 drawn without grad, then gradient.lv_copies copies of it re-noised to the "
              "last step and denoised in one step with grad (K=1); their rewards summed", "gradient", "copies"),
    Algorithm("refl", "ReFL: stop at a random step in the gradient.refl_* range and score its predicted x0",
              "gradient", "stop"),
    Algorithm("alignprop", "AlignProp: backpropagate through the last K steps, K uniform in "
              "[1, gradient.alignprop_max_k] per minibatch", "gradient", "random"),
    Algorithm("textcraftor", "TextCraftor: text-encoder LoRA; the base encoder drives all but the last "
              "round(gradient.textcraftor_fraction x T) steps, the fine-tuned one those", "gradient", "fraction",
              original_encoder_early=True),
):
    register(_entry)
