"""GAE against values computed by hand, including episode ends and truncation bootstrapping."""
import numpy as np
import pytest

from stages.rl.buffers import compute_gae


def test_single_env_no_done_matches_hand_computation():
    gamma, lam = 0.9, 0.8
    rewards = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    values = np.array([[0.5], [1.0], [1.5]], dtype=np.float32)
    dones = np.zeros((3, 1), dtype=bool)
    last_value = np.array([2.0], dtype=np.float32)
    adv, ret = compute_gae(rewards, values, dones, last_value, np.array([False]), gamma, lam)
    d2 = 3 + 0.9 * 2.0 - 1.5          # 3.3
    d1 = 2 + 0.9 * 1.5 - 1.0          # 2.35
    d0 = 1 + 0.9 * 1.0 - 0.5          # 1.4
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    np.testing.assert_allclose(adv[:, 0], [a0, a1, a2], rtol=1e-6)
    np.testing.assert_allclose(ret[:, 0], [a0 + 0.5, a1 + 1.0, a2 + 1.5], rtol=1e-6)


def test_episode_end_cuts_the_bootstrap():
    gamma, lam = 0.99, 0.95
    rewards = np.array([[1.0], [1.0], [1.0]], dtype=np.float32)
    values = np.array([[0.2], [0.3], [0.4]], dtype=np.float32)
    # The observation at t=2 starts a new episode: step 1 was the last of the first episode.
    dones = np.array([[False], [False], [True]])
    adv, _ = compute_gae(rewards, values, dones, np.array([5.0], dtype=np.float32), np.array([False]), gamma, lam)
    a2 = 1 + gamma * 5.0 - 0.4
    a1 = 1 - 0.3                      # no bootstrap across the episode end
    a0 = (1 + gamma * 0.3 - 0.2) + gamma * lam * a1
    np.testing.assert_allclose(adv[:, 0], [a0, a1, a2], rtol=1e-6)


def test_truncation_bootstrap_via_reward_equals_infinite_horizon_value():
    """A truncated step carries r + γV(s_T) in its reward (SB3's convention): its advantage is then
    exactly the one-step TD error against the final observation's value."""
    gamma, lam = 0.99, 0.95
    v_final = 7.0
    rewards = np.array([[1.0], [1.0 + gamma * v_final]], dtype=np.float32)
    values = np.array([[3.0], [4.0]], dtype=np.float32)
    dones = np.array([[False], [False]])
    adv, _ = compute_gae(rewards, values, dones, np.array([100.0], dtype=np.float32), np.array([True]), gamma, lam)
    assert adv[1, 0] == pytest.approx(1.0 + gamma * v_final - 4.0)
    assert adv[0, 0] == pytest.approx((1 + gamma * 4.0 - 3.0) + gamma * lam * adv[1, 0])


def test_two_envs_are_independent():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(5, 2)).astype(np.float32)
    values = rng.normal(size=(5, 2)).astype(np.float32)
    dones = rng.random((5, 2)) < 0.3
    last = rng.normal(size=2).astype(np.float32)
    last_dones = np.array([False, True])
    adv, _ = compute_gae(rewards, values, dones, last, last_dones, 0.99, 0.9)
    for i in range(2):
        solo, _ = compute_gae(rewards[:, i:i + 1], values[:, i:i + 1], dones[:, i:i + 1], last[i:i + 1],
                              last_dones[i:i + 1], 0.99, 0.9)
        np.testing.assert_allclose(adv[:, i], solo[:, 0], rtol=1e-6)
