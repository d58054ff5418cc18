"""The driver's view of a rollout: rows kept after dropping non-finite rewards map back to the
right shard rows, for the learner's batch and for the images the driver plots."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from actors.reward import RewardScores
from actors.rollout import Rollout
from rl.sampling import Trajectories


def _shard(first: int, size: int) -> Trajectories:
    """Trajectories whose row i is filled with the value first + i (its row in the epoch)."""
    rows = torch.arange(first, first + size)
    fill = rows.float().view(-1, 1, 1, 1, 1)
    return Trajectories(
        prompts=[f"p{r}" for r in rows.tolist()], prompt_ids=rows.view(-1, 1), negative_ids=rows.view(-1, 1),
        timesteps=rows.view(-1, 1).repeat(1, 2), latents=fill.expand(size, 3, 1, 2, 2).clone(),
        log_probs=rows.float().view(-1, 1).repeat(1, 2), images=rows.to(torch.uint8).view(-1, 1, 1, 1).expand(size, 3, 2, 2).clone(),
        seeds=rows, policy_version=4,
    )


def _rollout() -> Rollout:
    shards = [_shard(0, 3), _shard(3, 3), _shard(6, 2)]
    scores = torch.tensor([0.1, float("nan"), 0.3, 0.4, float("inf"), 0.6, 0.7, 0.8])
    return Rollout([f"p{i}" for i in range(8)], RewardScores(scores, {"part": scores * 2}), [3, 3, 2],
                   [[s.select([i]) for i in range(len(s))] for s in shards], [s.images for s in shards])


def test_kept_rows_reach_the_learner_and_the_plots_from_their_shards():
    rollout = _rollout()
    kept = rollout.select(torch.nonzero(torch.isfinite(rollout.scores.scores)).flatten())
    assert kept.prompts == ["p0", "p2", "p3", "p5", "p6", "p7"] and len(kept) == 6
    torch.testing.assert_close(kept.scores.parts["part"], torch.tensor([0.2, 0.6, 0.8, 1.2, 1.4, 1.6]))
    batch = kept.trajectories().fetch()
    assert batch.prompts == kept.prompts and batch.seeds.tolist() == [0, 2, 3, 5, 6, 7]
    assert batch.latents[:, 0, 0, 0, 0].tolist() == [0, 2, 3, 5, 6, 7] and batch.policy_version == 4
    # images of rows 1 and 4 of the kept rollout: epoch rows 2 and 6, in shards 0 and 2
    assert kept.images([1, 4])[:, 0, 0, 0].tolist() == [2, 6]
    # a learner rank fetches only its rows (positions among the kept rows), in its order
    assert kept.trajectories().fetch(torch.tensor([4, 1])).seeds.tolist() == [6, 2]
    # a second selection composes with the first
    again = kept.select(torch.tensor([0, 5]))
    assert again.trajectories().fetch().seeds.tolist() == [0, 7] and again.images([1])[:, 0, 0, 0].tolist() == [7]


def test_an_inline_rollout_is_read_without_ray(tmp_path):
    """Inline mode holds the objects themselves; reading them must not import Ray, so a machine
    without it (a lent GPU box, a laptop) can debug a run in one process."""
    script = tmp_path / "no_ray.py"
    script.write_text(
        "import sys\n"
        "sys.modules['ray'] = None  # importing ray now fails\n"
        "import test_rollout\n"
        "kept = test_rollout._rollout().select(test_rollout.torch.tensor([0, 7]))\n"
        "assert kept.trajectories().fetch().seeds.tolist() == [0, 7]\n"
        "assert kept.images([1])[:, 0, 0, 0].tolist() == [7]\n"
    )
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_concatenated_shards_carry_the_oldest_policy_version():
    """The learner's staleness check reads a batch's `policy_version`: shards sampled by different LoRA versions
    make a batch as old as its oldest, never the newest (which would hide stale rows)."""
    parts = [replace(_shard(0, 2), policy_version=5), replace(_shard(2, 2), policy_version=3),
             replace(_shard(4, 1), policy_version=4)]
    assert Trajectories.cat(parts).policy_version == 3


def test_select_keeps_every_field_of_a_row_together_in_the_given_order():
    """An unsorted index (a learner rank's rows, a shuffle) reorders prompts like the tensors."""
    batch = _shard(0, 4).select(torch.tensor([3, 0, 2]))
    assert batch.prompts == ["p3", "p0", "p2"] and batch.seeds.tolist() == [3, 0, 2]
    assert batch.latents[:, 0, 0, 0, 0].tolist() == [3, 0, 2]


def test_a_selection_keeps_what_resampling_a_lost_shard_needs():
    """`RayWorkers.resample` draws a lost shard again from the rollout's shard inputs with the LoRA that drew it:
    a rollout whose non-finite rows were dropped must still carry both (else the shard is drawn by no LoRA)."""
    from rl.lora import PolicyWeights

    weights = PolicyWeights(version=3)
    inputs = [(["p0", "p1", "p2"], [0, 1, 2], None), (["p3", "p4", "p5"], [3, 4, 5], None), (["p6", "p7"], [6, 7], None)]
    rollout = replace(_rollout(), shard_inputs=inputs, weights=weights)
    kept = rollout.select(torch.tensor([0, 2, 3]))
    assert kept.weights is weights and kept.shard_inputs == inputs and kept.sizes == [3, 3, 2]


def test_lost_shards_are_sampled_again_from_their_inputs_by_the_lora_that_drew_them_and_put_back_in_place():
    """`RayWorkers.resample`: the lost shards (0 and 2 of 3) are drawn again in one rollout from their prompts, seeds
    and start seeds (sample.shared_start_noise) with the rollout's LoRA; each goes back to its place, the rest stays."""
    from actors.topology import RayWorkers
    from rl.lora import PolicyWeights

    weights = PolicyWeights(version=3)
    inputs = [(["p0", "p1", "p2"], [0, 1, 2], [0, 0, 0]), (["p3", "p4", "p5"], [3, 4, 5], [3, 3, 3]),
              (["p6", "p7"], [6, 7], [6, 6])]
    rollout = replace(_rollout(), shard_inputs=inputs, weights=weights)
    drawn = []

    def rollout_again(lora, prompts, seeds, start_seeds=None):
        drawn.append((lora, prompts, seeds, start_seeds))
        return Rollout(prompts, RewardScores(torch.zeros(len(prompts)), {}), [3, 2], [["shard 0"] * 3, ["shard 2"] * 2],
                       ["images 0", "images 2"])

    workers = object.__new__(RayWorkers)
    workers.rollout = rollout_again
    again = workers.resample(rollout, [0, 2])
    assert drawn == [(weights, ["p0", "p1", "p2", "p6", "p7"], [0, 1, 2, 6, 7], [0, 0, 0, 6, 6])]
    assert again.trajectory_shards[0] == ["shard 0"] * 3 and again.trajectory_shards[2] == ["shard 2"] * 2
    assert again.image_shards[::2] == ["images 0", "images 2"]
    assert again.trajectory_shards[1] is rollout.trajectory_shards[1] and again.image_shards[1] is rollout.image_shards[1]
    assert again.scores is rollout.scores
