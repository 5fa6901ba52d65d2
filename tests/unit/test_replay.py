"""SAC's replay buffer: compact storage keeps every transition's true next observation,
truncation is not termination, commands are deduplicated, offline data mixes at the set ratio."""
from types import SimpleNamespace

import numpy as np
import pytest

from stages.rl.replay import ReplayBuffer


def _state(env, episode, t):
    return np.array([env, episode, t], dtype=np.float32)


def _drive(buffer, num_envs, steps, rng, p_end=0.15):
    """Fill ``buffer`` with transitions whose states name (env, episode, t); return the count."""
    episode = np.arange(num_envs) * 1000
    t = np.zeros(num_envs, dtype=int)
    for _ in range(steps):
        obs = {"state": np.stack([_state(e, episode[e], t[e]) for e in range(num_envs)])}
        done = rng.random(num_envs) < p_end
        terminated = done & (rng.random(num_envs) < 0.5)
        # next_obs holds the final observation for ended episodes (what SACTrainer stores).
        nxt = {"state": np.stack([_state(e, episode[e], t[e] + 1) for e in range(num_envs)])}
        actions = obs["state"][:, 2:3].repeat(2, 1)
        buffer.add(obs, actions, obs["state"][:, 2] * 10, nxt, terminated, done)
        t += 1
        episode[done] += 1
        t[done] = 0
    return steps * num_envs


@pytest.mark.parametrize("num_envs,capacity", [(1, 50), (3, 40), (4, 10_000)])
def test_every_sampled_transition_ends_in_its_own_next_observation(num_envs, capacity):
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(capacity, 3, action_dim=2, num_envs=num_envs)
    _drive(buffer, num_envs, 300, rng)  # wraps the small rings several times
    batch = buffer.sample(512, rng)
    s, n = batch.obs["state"].numpy(), batch.next_obs["state"].numpy()
    np.testing.assert_array_equal(n[:, :2], s[:, :2])          # same env, same episode
    np.testing.assert_array_equal(n[:, 2], s[:, 2] + 1)        # the following step, final obs included
    np.testing.assert_array_equal(batch.actions.numpy()[:, 0], s[:, 2])
    np.testing.assert_allclose(batch.rewards.numpy(), s[:, 2] * 10)
    assert buffer.online_size <= capacity + num_envs


def test_truncation_keeps_final_observation_and_does_not_terminate():
    buffer = ReplayBuffer(100, 1, action_dim=1)
    zero = np.zeros((1, 1), np.float32)
    buffer.add({"state": zero + 0}, zero, np.ones(1), {"state": zero + 1}, np.array([False]), np.array([False]))
    # Truncated: next_obs is the final observation (2), the env has already reset to 100.
    buffer.add({"state": zero + 1}, zero, np.ones(1), {"state": zero + 2}, np.array([False]), np.array([True]))
    buffer.add({"state": zero + 100}, zero, np.ones(1), {"state": zero + 101}, np.array([True]), np.array([True]))
    assert buffer.online_size == 3
    batch = buffer.sample(300, np.random.default_rng(0))
    pairs = {(float(a), float(b), float(c)) for a, b, c in zip(batch.obs["state"][:, 0], batch.next_obs["state"][:, 0],
                                                               batch.terminated)}
    assert pairs == {(0.0, 1.0, 0.0), (1.0, 2.0, 0.0), (100.0, 101.0, 1.0)}


def test_images_stay_uint8_and_commands_are_stored_once():
    buffer = ReplayBuffer(1000, 2, action_dim=3, num_envs=2, image_shape=(8, 8, 3), token_length=6)
    rng = np.random.default_rng(0)
    commands = np.array([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
    for i in range(50):
        obs = {"image": rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8), "state": np.zeros((2, 2), np.float32),
               "tokens": commands[[i % 2, 1]][:, :4]}  # shorter rows are zero-padded
        buffer.add(obs, np.zeros((2, 3)), np.zeros(2), obs, np.zeros(2, bool), np.zeros(2, bool))
    assert buffer._online.images.dtype == np.uint8
    assert len(buffer._text_table) == 2
    batch = buffer.sample(64, rng)
    assert batch.obs["image"].dtype.is_floating_point is False
    assert {tuple(r) for r in batch.obs["tokens"].tolist()} <= {tuple(r) for r in commands.tolist()}


def _samples(n_episodes=3, length=10, terminated_last=(True, False, True), image=4):
    rows = n_episodes * length
    episode = np.repeat(np.arange(n_episodes), length)
    t = np.tile(np.arange(length), n_episodes)
    dones = t == length - 1
    term = dones & np.repeat(np.array(terminated_last), length)
    return SimpleNamespace(
        images=np.full((rows, image, image, 3), 7, np.uint8), states=np.stack([episode, t], 1).astype(np.float32),
        actions=np.zeros((rows, 3), np.float32), rewards=t.astype(np.float32), dones=dones, terminated=term,
        commands=np.array(["follow the lane", "turn left"] * (rows // 2)), episode=episode)


def _tokenize(texts):
    return np.array([[1, len(t), 2, 0] for t in texts])


def test_offline_partition_keeps_terminated_ends_and_drops_truncated_ones():
    buffer = ReplayBuffer.from_samples(_samples(), capacity=100, tokenize=_tokenize, offline_ratio=1.0)
    assert buffer.offline_size == 3 * 9 + 2  # every step with a next observation, plus 2 terminal ends
    batch = buffer.sample(500, np.random.default_rng(0))
    s, n, term = batch.obs["state"].numpy(), batch.next_obs["state"].numpy(), batch.terminated.numpy()
    assert batch.offline.all()
    inner = term == 0
    np.testing.assert_array_equal(n[inner], s[inner] + [0, 1])
    assert set(s[~inner][:, 0]) == {0.0, 2.0} and (s[~inner][:, 1] == 9).all()
    assert 1.0 not in set(s[s[:, 1] == 9][:, 0])  # the truncated episode's last step is gone


def test_batches_mix_offline_and_online_at_the_ratio():
    buffer = ReplayBuffer(100, 2, action_dim=3, image_shape=(4, 4, 3), token_length=4, offline_ratio=0.25)
    rng = np.random.default_rng(0)
    buffer.add_offline_samples(_samples(), _tokenize)
    # Online empty: everything comes from the offline partition.
    assert buffer.sample(16, rng).offline.all()
    obs = {"image": np.zeros((1, 4, 4, 3), np.uint8), "state": np.full((1, 2), -1, np.float32),
           "tokens": np.array([[1, 9, 2, 0]])}
    for _ in range(20):
        buffer.add(obs, np.zeros((1, 3)), np.zeros(1), obs, np.zeros(1, bool), np.zeros(1, bool))
    batch = buffer.sample(64, rng)
    assert int(batch.offline.sum()) == 16
    assert (batch.obs["state"][~batch.offline] == -1).all() and (batch.obs["state"][batch.offline] >= 0).all()


def test_offline_data_of_another_image_size_is_refused():
    buffer = ReplayBuffer(100, 2, action_dim=3, image_shape=(8, 8, 3), token_length=4)
    with pytest.raises(ValueError, match="image_size"):
        buffer.add_offline_samples(_samples(image=4), _tokenize)


def test_state_dict_round_trip_restores_the_same_samples():
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(64, 3, action_dim=2, num_envs=2)
    _drive(buffer, 2, 50, rng)
    copy = ReplayBuffer(64, 3, action_dim=2, num_envs=2)
    copy.load_state_dict(buffer.state_dict())
    a, b = buffer.sample(32, np.random.default_rng(5)), copy.sample(32, np.random.default_rng(5))
    np.testing.assert_array_equal(a.obs["state"], b.obs["state"])
    np.testing.assert_array_equal(a.next_obs["state"], b.next_obs["state"])
    _drive(copy, 2, 5, rng)  # and it keeps filling where it stopped
    assert copy.online_size >= buffer.online_size


def test_offline_partition_reads_the_built_datasets_next_index():
    # SplitArrays-like: next_index (-1: none), terminated, action_valid (False: no controls known).
    states = np.arange(6, dtype=np.float32)[:, None].repeat(2, 1)
    samples = SimpleNamespace(
        images=np.zeros((6, 4, 4, 3), np.uint8), states=states, actions=np.zeros((6, 3), np.float32),
        rewards=np.arange(6, dtype=np.float32), commands=np.array(["go"] * 6),
        next_index=np.array([1, 2, -1, 4, -1, -1]), terminated=np.array([0, 0, 1, 0, 0, 0], bool),
        action_valid=np.array([1, 1, 1, 1, 1, 0], bool))
    buffer = ReplayBuffer.from_samples(samples, capacity=10, tokenize=_tokenize, offline_ratio=1.0)
    # rows 0, 1, 3 have a next observation; row 2 terminated; 4 is truncated; 5 has no action.
    assert buffer.offline_size == 4
    batch = buffer.sample(200, np.random.default_rng(0))
    pairs = {(int(a), int(b)) for a, b in zip(batch.obs["state"][:, 0], batch.next_obs["state"][:, 0])}
    assert pairs == {(0, 1), (1, 2), (2, 2), (3, 4)}
