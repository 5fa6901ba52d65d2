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


# -- GAE inside the trainer, on a tiny env whose every number is known -----------------------------

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402

from stages.rl.buffers import RolloutBuffer  # noqa: E402
from stages.rl.configs import PPOConfig  # noqa: E402
from stages.rl.policies import MLPActorCritic  # noqa: E402
from stages.rl.ppo import PPOTrainer  # noqa: E402


class _Steps(gym.Env):
    """Reward ``t + 1`` on step ``t``; ends after ``length`` steps, terminated or truncated."""

    observation_space = gym.spaces.Box(-1e3, 1e3, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, length: int, terminate: bool):
        self.length, self.terminate, self.t = length, terminate, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        end = self.t >= self.length
        return (np.array([self.t], np.float32), float(self.t), end and self.terminate,
                end and not self.terminate, {})


def _constant_critic(value: float) -> MLPActorCritic:
    """A critic that answers ``value`` everywhere (last layer zero, bias = value)."""
    model = MLPActorCritic(1, [-1.0], [1.0], hidden=(4,))
    last = model.value_head[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, value)
    return model


@pytest.mark.parametrize("terminate", [False, True])
def test_trainer_rollout_matches_hand_computed_gae_with_truncation(terminate):
    gamma, lam, v = 0.9, 0.8, 2.0
    env = gym.vector.SyncVectorEnv([lambda: _Steps(3, terminate)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    trainer = PPOTrainer(_constant_critic(v), env, PPOConfig(num_steps=4, batch_size=4, gamma=gamma, gae_lambda=lam))
    buffer = RolloutBuffer(4, 1, trainer.adapter.fields(), 1)
    trainer.collect_rollouts(buffer)

    # Steps 0-2 are the first episode (rewards 1, 2, 3), step 3 the first of the next (reward 1).
    # Truncation: the last step's reward carries gamma * V(final_obs); termination does not.
    r = [1.0, 2.0, 3.0 + (0.0 if terminate else gamma * v), 1.0]
    np.testing.assert_allclose(buffer.rewards[:, 0], r, rtol=1e-6)
    np.testing.assert_array_equal(buffer.dones[:, 0], [False, False, False, True])
    d3 = r[3] + gamma * v - v            # bootstraps from the observation after the rollout
    d2 = r[2] - v                        # the episode ended here: no bootstrap across it
    d1 = r[1] + gamma * v - v
    d0 = r[0] + gamma * v - v
    a3 = d3
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    np.testing.assert_allclose(buffer.advantages[:, 0], [a0, a1, a2, a3], rtol=1e-5)
    np.testing.assert_allclose(buffer.returns[:, 0], np.array([a0, a1, a2, a3]) + v, rtol=1e-5)
    env.close()
