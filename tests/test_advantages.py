"""Advantage normalisation: per-prompt tracker, groups, clipping."""
import numpy as np
import pytest

from rl.advantages import PerPromptStatTracker, compute_advantages, group_advantages, group_keys


def test_tracker_uses_batch_statistics_below_min_count():
    tracker = PerPromptStatTracker(buffer_size=16, min_count=4)
    prompts = ["a", "a", "b", "b"]
    rewards = np.array([1.0, 2.0, 10.0, 20.0])
    adv = tracker.update(prompts, rewards)
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    np.testing.assert_allclose(adv, expected)


def test_tracker_uses_prompt_history_at_min_count():
    tracker = PerPromptStatTracker(buffer_size=16, min_count=4)
    tracker.update(["a", "a", "b"], np.array([0.0, 2.0, 100.0]))
    adv = tracker.update(["a", "a", "b"], np.array([4.0, 6.0, 50.0]))
    history_a = np.array([0.0, 2.0, 4.0, 6.0])  # 4 >= min_count: prompt statistics
    np.testing.assert_allclose(adv[:2], (np.array([4.0, 6.0]) - history_a.mean()) / (history_a.std() + 1e-6))
    batch = np.array([4.0, 6.0, 50.0])  # 'b' has 2 < min_count: batch statistics
    np.testing.assert_allclose(adv[2], (50.0 - batch.mean()) / (batch.std() + 1e-6))


def test_tracker_buffer_keeps_only_recent_rewards_and_round_trips():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    for r in [1.0, 2.0, 3.0, 4.0]:
        tracker.update(["p"], np.array([r]))
    assert list(tracker.history["p"]) == [2.0, 3.0, 4.0]
    clone = PerPromptStatTracker(buffer_size=3, min_count=1)
    clone.load_state_dict(tracker.state_dict())
    np.testing.assert_allclose(clone.update(["p"], np.array([5.0])), tracker.update(["p"], np.array([5.0])))


def test_a_resumed_tracker_keeps_the_histories_under_the_resumes_settings():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=4)
    tracker.update(["p"] * 4, np.array([1.0, 2.0, 3.0, 4.0]))
    resumed = PerPromptStatTracker(buffer_size=2, min_count=1)  # `--resume RUN advantage.buffer_size=2 ...`
    resumed.load_state_dict(tracker.state_dict())
    assert list(resumed.history["p"]) == [3.0, 4.0] and resumed.min_count == 1
    resumed.update(["p"], np.array([5.0]))
    assert list(resumed.history["p"]) == [4.0, 5.0]


def test_group_keys_pool_a_prompts_groups_unless_each_group_started_from_its_own_x_T():
    prompts, rows = ["x", "x", "y", "y", "x", "x"], [0, 1, 2, 3, 4, 5]  # groups of 2: x, y, x again
    assert group_keys(prompts, rows, 2, shared_start=False) == prompts
    shared = group_keys(prompts, rows, 2, shared_start=True)
    assert shared == [("x", 0), ("x", 0), ("y", 1), ("y", 1), ("x", 2), ("x", 2)]
    # rows are epoch positions: with row 1 dropped (a non-finite reward) the others keep their groups
    assert group_keys(["x", "y", "y", "x", "x"], [0, 2, 3, 4, 5], 2, shared_start=True)[-2:] == [("x", 2), ("x", 2)]
    # the two x groups started from different x_T (rewards near 1 and near 3): shared, each is normalised alone
    rewards = np.array([0.9, 1.1, 5.0, 7.0, 2.9, 3.1])
    np.testing.assert_allclose(group_advantages(shared, rewards), [-1, 1, -1, 1, -1, 1], atol=1e-4)
    pooled = group_advantages(prompts, rewards)
    assert pooled[0] < -0.9 and pooled[1] < -0.7 and pooled[4] > 0.7  # pooled: the start decides the sign


def test_group_advantages_normalise_within_prompt():
    adv = group_advantages(["x", "x", "y", "y"], np.array([1.0, 3.0, 100.0, 300.0]))
    np.testing.assert_allclose(adv, [-1.0, 1.0, -1.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(group_advantages(["x", "y"], np.array([1.0, 2.0])), [0.0, 0.0])


def test_advantages_are_clipped():
    rewards = np.array([0.0] * 99 + [1000.0])
    adv = compute_advantages(["p"] * 100, rewards, mode="batch", adv_clip_max=5.0, tracker=None)
    assert adv.max() == pytest.approx(5.0)
    # and from below: one very bad sample's advantage (-9.95 unclipped) is held at -5 too
    low = compute_advantages(["p"] * 100, -rewards, mode="batch", adv_clip_max=5.0, tracker=None)
    assert low.min() == pytest.approx(-5.0)
    with pytest.raises(ValueError, match="unknown advantage mode"):
        compute_advantages(["p"], rewards[:1], mode="nope", adv_clip_max=5.0, tracker=None)
