"""SACTrainer on a tiny DrivingVLA in the embedded driving env: updates happen with finite losses,
targets trail the critics, offline data mixes at the set ratio, frozen parts stay frozen, and the
critic target bootstraps through truncation but not through termination."""
import math
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from models import DrivingVLA, DrivingVLAConfig
from models.q_heads import TwinQHead
from stages.envs import EnvConfig, make_env
from stages.rl.configs import SACConfig
from stages.rl.replay import ReplayBatch
from stages.rl.sac import SACTrainer
from stages.rl.sac_networks import MLPActor

ENCODER_PREFIXES = DrivingVLA.ENCODER_MODULES  # the model names its encoders

IMAGE = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The machine is shared: one intra-op thread is faster than two fighting for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env():
    e = make_env(EnvConfig(image_size=IMAGE, max_episode_steps=20), seed=0)
    yield e
    e.close()


def _model(seed=0):
    torch.manual_seed(seed)
    return DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=IMAGE, max_text_length=48))


def _cfg(**kw):
    base = dict(batch_size=8, learning_starts=8, buffer_size=400, learning_rate=1e-3)
    return SACConfig(**{**base, **kw})


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module, prefixes):
    return {n for n, p in module.named_parameters() if n.startswith(prefixes) and not torch.equal(before[n], p)}


def test_sac_updates_driving_model_with_finite_losses(env):
    model = _model()
    trainer = SACTrainer(model, env, _cfg(), seed=0)
    model0, critic0, target0 = _snapshot(model), _snapshot(trainer.critic), _snapshot(trainer.critic_target)
    stats = trainer.train(24)
    assert trainer.global_step == 24
    assert trainer.updates == 24 - 8 + 1  # one update per env step from learning_starts on
    assert math.isfinite(stats["critic_loss"]) and math.isfinite(stats["actor_loss"])
    assert _changed(model0, model, ("policy_head",)) and _changed(model0, model, ("fusion", "vision"))
    assert _changed(critic0, trainer.critic, ("q1", "q2"))
    # Targets moved, but only a tau-step toward the critics.
    assert _changed(target0, trainer.critic_target, ("q1", "q2"))
    assert not torch.equal(trainer.critic.q1.net[0].weight, trainer.critic_target.q1.net[0].weight)
    assert trainer.episode_returns  # 24 steps of 20-step episodes: one ended


def test_freeze_encoders_leaves_encoder_weights_unchanged(env):
    model = _model()
    trainer = SACTrainer(model, env, _cfg(freeze_encoders=True), seed=0)
    before = _snapshot(model)
    trainer.train(14)
    assert trainer.updates > 0
    assert not _changed(before, model, ENCODER_PREFIXES)
    assert _changed(before, model, ("policy_head",)) and _changed(before, model, ("fusion",))


def test_train_trunk_false_trains_the_heads_only(env):
    model = _model()
    trainer = SACTrainer(model, env, _cfg(train_trunk=False), seed=0)
    before = _snapshot(model)
    trainer.train(14)
    changed = _changed(before, model, ("",))
    assert changed and all(n.startswith("policy_head") for n in changed)


def test_actor_warmup_trains_the_critics_first_and_the_actor_after(env):
    model = _model()
    trainer = SACTrainer(model, env, _cfg(train_trunk=False, actor_warmup_updates=5), seed=0)
    before, critic0, alpha0 = _snapshot(model), _snapshot(trainer.critic), trainer.log_alpha.detach().clone()
    stats = trainer.train(12)                      # updates 1..5 at steps 8..12: all within the warm-up
    assert trainer.updates == 5 and stats["actor_warmup"] == 1.0 and "actor_loss" not in stats
    assert _changed(critic0, trainer.critic, ("q1", "q2"))
    assert not _changed(before, model, ("",)) and torch.equal(trainer.log_alpha, alpha0)
    stats = trainer.train(16)                      # updates 6.. train the actor and alpha too
    assert stats["actor_warmup"] == 0.0 and math.isfinite(stats["actor_loss"])
    assert _changed(before, model, ("policy_head",)) and not torch.equal(trainer.log_alpha, alpha0)


def _offline_samples(n=60, episode_length=15):
    rng = np.random.default_rng(0)
    t = np.arange(n) % episode_length
    return SimpleNamespace(
        images=rng.integers(0, 255, (n, IMAGE, IMAGE, 3), dtype=np.uint8),
        states=rng.normal(size=(n, 8)).astype(np.float32),
        actions=rng.uniform([0, -1, 0], [1, 1, 1], (n, 3)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32), dones=t == episode_length - 1,
        terminated=t == episode_length - 1, commands=np.array(["follow the lane"] * n),
        episode=np.arange(n) // episode_length)


def test_offline_seeding_mixes_the_configured_ratio(env):
    fractions = []
    trainer = SACTrainer(_model(), env, _cfg(offline_ratio=0.25, learning_starts=4), seed=0,
                         offline_data=_offline_samples())
    assert trainer.buffer.offline_size == 60
    original = trainer.update
    trainer.update = lambda batch=None: (s := original(batch), fractions.append(s["offline_fraction"]))[0]
    trainer.train(12)
    assert len(fractions) == 9 and all(f == 0.25 for f in fractions)  # round(8 * 0.25) = 2 rows


def test_alpha_is_tuned_toward_the_target_entropy_or_kept_fixed(env):
    tuned = SACTrainer(_model(), env, _cfg(), seed=0)
    stats = tuned.train(16)
    # A fresh policy is far more random than the target (-3 nats): alpha must shrink.
    assert stats["entropy"] > tuned.target_entropy and stats["alpha"] < 0.2
    fixed = SACTrainer(_model(), env, _cfg(autotune_alpha=False, alpha=0.1), seed=0)
    assert fixed.train(10)["alpha"] == pytest.approx(0.1)


def test_utd_ratio_sets_updates_per_env_step(env):
    trainer = SACTrainer(_model(), env, _cfg(utd_ratio=0.5, learning_starts=8), seed=0)
    trainer.train(20)
    assert trainer.updates == 6  # 13 steps from learning_starts on, half an update each


def test_state_dict_round_trip_continues_the_same_run(env):
    trainer = SACTrainer(_model(), env, _cfg(), seed=0)
    trainer.train(12)
    state = trainer.state_dict(include_buffer=True)
    resumed = SACTrainer(_model(seed=1), env, _cfg(), seed=3)
    resumed.load_state_dict(state)
    assert (resumed.global_step, resumed.updates) == (12, trainer.updates)
    assert resumed.buffer.online_size == trainer.buffer.online_size
    for a, b in zip(trainer.critic.parameters(), resumed.critic.parameters()):
        assert torch.equal(a, b)
    resumed.train(16)
    assert resumed.global_step == 16 and resumed.updates == trainer.updates + 4


def _pendulum_trainer(**kw):
    env = gym.make("Pendulum-v1")
    trainer = SACTrainer(MLPActor.for_env(env, hidden_dim=16), env,
                         SACConfig(batch_size=8, learning_starts=0, **kw), seed=0)
    # Q heads that output a constant: the critic loss then shows the TD target itself.
    for head, value in ((trainer.critic, 0.0), (trainer.critic_target, 5.0)):
        for q in (head.q1, head.q2):
            torch.nn.init.zeros_(q.net[-1].weight)
            torch.nn.init.constant_(q.net[-1].bias, value)
    return trainer


def _batch(terminated):
    obs = {"state": torch.randn(8, 3)}
    return ReplayBatch(obs=obs, actions=torch.zeros(8, 1), rewards=torch.arange(8.0),
                       next_obs={"state": torch.randn(8, 3)}, terminated=torch.full((8,), float(terminated)),
                       offline=torch.zeros(8, dtype=torch.bool))


def test_termination_cuts_the_bootstrap_and_truncation_does_not():
    r = torch.arange(8.0)
    trainer = _pendulum_trainer(gamma=0.9)
    # critic 0 everywhere: loss = 0.5 * (mse + mse) = mean(target^2); terminated target = r.
    assert trainer.update(_batch(terminated=True))["critic_loss"] == pytest.approx(float((r ** 2).mean()))
    trainer = _pendulum_trainer(gamma=0.9, autotune_alpha=False, alpha=0.0)
    # not terminated (a truncated step included): target = r + gamma * Q_target(s', a') = r + 0.9 * 5
    assert trainer.update(_batch(terminated=False))["critic_loss"] == pytest.approx(float(((r + 4.5) ** 2).mean()))


def test_twin_q_head_scales_actions_to_unit_box():
    head = TwinQHead(4, (0.0, -1.0, 0.0), (1.0, 1.0, 1.0), hidden_dim=8)
    np.testing.assert_allclose(head.normalize_action(torch.tensor([[1.0, 0.0, 0.5]])), [[1.0, 0.0, 0.0]])
    q1, q2 = head(torch.randn(5, 4), torch.rand(5, 3))
    assert q1.shape == q2.shape == (5,) and not torch.equal(q1, q2)


# -- what the replay buffer stores ---------------------------------------------------------------

def test_frozen_parts_are_stored_once_and_give_the_models_own_features(env):
    from stages.rl.policies import make_obs_adapter

    obs, _ = make_env(EnvConfig(image_size=IMAGE, max_episode_steps=20), seed=3).reset(seed=3)
    for kw, storage, fields in ((dict(freeze_encoders=True), "encoded", {"vision_tokens", "text_features", "state"}),
                                (dict(train_trunk=False), "features", {"features"}),
                                ({}, "raw", {"image", "state", "tokens"})):
        model = _model()
        trainer = SACTrainer(model, env, _cfg(**kw), seed=0)
        assert trainer.storage == storage and set(trainer.buffer.fields) == fields
        batch = trainer.adapter.batch_one(obs)
        with torch.no_grad():
            stored = trainer._compute_features(*trainer._inputs(trainer.encode(batch)))
            direct = model.compute_features(*make_obs_adapter(model, env.observation_space).to_inputs(batch, "cpu"))
        torch.testing.assert_close(stored, direct, rtol=1e-4, atol=1e-5)


# -- stepping ---------------------------------------------------------------------------------------

class _RecordingVectorEnv(gym.vector.SyncVectorEnv):
    """A vector env with step_async / step_wait (as AsyncVectorEnv has) that records their order."""

    def __init__(self, fns, events):
        super().__init__(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        self.events = events

    def step_async(self, actions):
        self.events.append("async")
        self._actions_in_flight = actions

    def step_wait(self):
        self.events.append("wait")
        return self.step(self._actions_in_flight)


def _latency_env_fns(n, max_episode_steps=5):
    import functools

    from stages.envs.testing import FixedLatencyEnv

    return [functools.partial(FixedLatencyEnv, step_seconds=0.0, image_size=IMAGE, max_episode_steps=max_episode_steps)
            for _ in range(n)]


def test_updates_run_while_the_vector_env_steps():
    events = []
    trainer = SACTrainer(_model(), _RecordingVectorEnv(_latency_env_fns(2), events),
                         _cfg(train_trunk=False, learning_starts=8, utd_ratio=0.5), seed=0)
    original = trainer.update
    trainer.update = lambda batch=None: (events.append("update"), original(batch))[1]
    trainer.train(16)
    # Steps 1-3 (global steps 2-6) owe nothing; from step 4 (global 8) on each step owes one update,
    # run between sending the actions and collecting the step.
    assert events[:6] == ["async", "wait"] * 3
    assert events[6:] == ["async", "update", "wait"] * 5
    assert trainer.updates == 5


def test_env_pool_steps_envs_apart_and_stores_every_true_next_observation():
    trainer = SACTrainer(_model(), _latency_env_fns(3), _cfg(freeze_encoders=True, learning_starts=8, utd_ratio=0.5),
                         seed=0)
    try:
        assert trainer.env is None and trainer.num_envs == 3
        trainer.train(60)
        steps = trainer.global_step
        assert 60 <= steps < 63
        # Half an update per env step from learning_starts on, all run by the end.
        assert trainer.updates == int((steps - 8 + 1) * 0.5)
        assert trainer.buffer.online_size == steps
        batch = trainer.buffer.sample(256, np.random.default_rng(0))
        # FixedLatencyEnv's state[7] is t / 5: every transition ends one step later, the episode's
        # last one (truncated, so not terminated) in the real final observation t = 5.
        progress = batch.next_obs["state"][:, 7] - batch.obs["state"][:, 7]
        torch.testing.assert_close(progress, torch.full_like(progress, 0.2))
        assert (batch.terminated == 0).all() and (batch.next_obs["state"][:, 7] == 1.0).any()
        assert len(trainer.episode_returns) >= 3 * (steps // 3 // 5) - 3
        assert set(trainer.episode_completion) == {1.0}
    finally:
        trainer.close()


# -- checkpoints ---------------------------------------------------------------------------------

def _pendulum(**kw):
    env = gym.make("Pendulum-v1")
    torch.manual_seed(0)
    return SACTrainer(MLPActor.for_env(env, hidden_dim=16), env,
                      SACConfig(batch_size=8, learning_starts=10, q_hidden_dim=16, **kw), seed=0)


def test_checkpoints_resume_with_the_buffer_or_refill_it_first(tmp_path):
    from stages.rl.checkpoint import TrainingCheckpoint

    # Small buffer: saved with the checkpoint, so the resumed run updates on every step.
    first = _pendulum()
    first.train(60, save_dir=tmp_path / "with", checkpoint_every_steps=25)
    saved = TrainingCheckpoint(tmp_path / "with").load()
    assert saved["global_step"] == 60 and saved["updates"] == 51 and "buffer" in saved
    assert "actions" in saved["rng"] and "torch" in saved["rng"]
    resumed = _pendulum()
    resumed.train(100, save_dir=tmp_path / "with")
    assert resumed.updates == 100 - 10 + 1
    assert resumed.buffer.online_size == 100

    # Over the size limit: left out; the resumed run refills batch_size steps before updating.
    first = _pendulum()
    first.train(60, save_dir=tmp_path / "without", checkpoint_buffer_bytes=0)
    assert "buffer" not in TrainingCheckpoint(tmp_path / "without").load()
    resumed = _pendulum()
    resumed.train(100, save_dir=tmp_path / "without")
    assert resumed.buffer.online_size == 40
    assert resumed.updates == 51 + (100 - (60 + 8) + 1)


def test_callback_stop_writes_the_checkpoint_and_scalars(tmp_path):
    from stages.rl.checkpoint import TrainingCheckpoint
    from stages.rl.scalars import read_scalars

    trainer = _pendulum()
    trainer.log_interval = 20
    seen = []
    trainer.train(1000, save_dir=tmp_path, checkpoint_every_steps=1000,
                  callback=lambda stats: seen.append(stats["global_step"]) or len(seen) < 2)
    assert seen == [20.0, 40.0] and trainer.global_step == 40
    assert TrainingCheckpoint(tmp_path).load()["global_step"] == 40
    assert [step for step, _ in read_scalars(tmp_path / "scalars.jsonl")["sac/global_step"]] == [20, 40]


def test_a_checkpoint_of_other_settings_or_of_ppo_is_not_resumed(tmp_path, caplog):
    import logging

    from stages.rl.checkpoint import TrainingCheckpoint

    TrainingCheckpoint(tmp_path).save({"model": {}, "optimizer": {}, "global_step": 64, "updates": 2})  # PPO's
    trainer = _pendulum()
    with caplog.at_level(logging.WARNING, logger="stages.rl.sac"):
        trainer.train(20, save_dir=tmp_path)
    assert "not a SAC checkpoint" in caplog.text and trainer.global_step == 20
    wider = SACTrainer(MLPActor.for_env(gym.make("Pendulum-v1"), hidden_dim=32), gym.make("Pendulum-v1"),
                       SACConfig(batch_size=8, learning_starts=10, q_hidden_dim=16), seed=0)
    with caplog.at_level(logging.WARNING, logger="stages.rl.sac"):
        wider.train(30, save_dir=tmp_path)
    assert "its model has other parameters" in caplog.text and wider.global_step == 30
