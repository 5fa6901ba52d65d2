"""PPO pieces: the MLP actor-critic, the observation adapters, the update, checkpoints."""
import gymnasium as gym
import numpy as np
import pytest
import torch

from models import DrivingVLA, DrivingVLAConfig
from stages.envs.spaces import observation_space
from stages.envs.testing import FixedLatencyEnv
from stages.rl.buffers import RolloutBuffer
from stages.rl.checkpoint import TrainingCheckpoint
from stages.rl.configs import PPOConfig
from stages.rl.policies import (BoxObsAdapter, DrivingObsAdapter, EncodedDrivingAdapter, MLPActorCritic,
                                make_obs_adapter)
from stages.rl.ppo import PPOTrainer


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny networks: one intra-op thread is fastest, and it does not fight other jobs for the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pendulum(n: int = 2) -> gym.vector.VectorEnv:
    return gym.make_vec("Pendulum-v1", num_envs=n, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})


def test_mlp_actor_critic_respects_bounds_and_scores_its_own_actions():
    torch.manual_seed(0)
    model = MLPActorCritic(3, [-2.0], [2.0])
    obs = torch.randn(256, 3)
    action, log_prob, value = model.act(obs)
    assert action.shape == (256, 1) and log_prob.shape == (256,) and value.shape == (256,)
    assert action.abs().max() <= 2.0
    again, entropy, value2 = model.evaluate_actions(obs, action)
    torch.testing.assert_close(again, log_prob, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(value2, value)
    assert torch.isfinite(entropy).all()
    # The small last policy layer starts the mean action near the centre of the box.
    assert model.act(obs, deterministic=True)[0].abs().max() < 0.2


def test_adapter_is_chosen_by_observation_space():
    model = DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32, max_text_length=32))
    space = observation_space(32)
    assert type(make_obs_adapter(model, space)) is DrivingObsAdapter
    assert type(make_obs_adapter(model, space, encoded=True)) is EncodedDrivingAdapter
    assert type(make_obs_adapter(None, gym.spaces.Box(-1, 1, (3,)))) is BoxObsAdapter
    with pytest.raises(TypeError, match="no observation adapter"):
        make_obs_adapter(model, gym.spaces.Discrete(3))


@pytest.mark.parametrize("critic_fusion", [False, True])
def test_encoded_policy_equals_the_model_on_raw_observations(critic_fusion):
    """Frozen encoders: what the rollout stores (encoder outputs) gives the model's exact numbers."""
    torch.manual_seed(0)
    model = DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32, max_text_length=48)).eval()
    if critic_fusion:  # a critic of its own, made to differ from the policy's fusion
        model.add_critic_fusion()
        with torch.no_grad():
            model.critic_fusion.norm.weight.mul_(2.0)
    rng = np.random.default_rng(0)
    obs = {"image": rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
           "state": rng.normal(size=(5, 8)).astype(np.float32),
           "command": ["turn left at the next intersection", "follow the lane", "stop", "follow the lane", "go"]}
    raw, enc = DrivingObsAdapter(model, observation_space(32)), EncodedDrivingAdapter(model, observation_space(32))
    actions = torch.rand(5, 3) * 0.8 + 0.1
    with torch.no_grad():
        expected = model.evaluate_actions(*raw.to_inputs(obs, "cpu"), actions)
        got = enc.policy(model).evaluate_actions(*enc.to_inputs(obs, "cpu"), actions)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    fields = enc.encode(obs)
    assert set(fields) == set(enc.fields()) and "image" not in fields
    assert fields["vision_tokens"].shape[1:] == enc.fields()["vision_tokens"][0]


def test_buffer_minibatches_cover_every_step_once():
    buf = RolloutBuffer(4, 3, {"obs": ((2,), np.float32)}, action_dim=1)
    for t in range(4):
        buf.add({"obs": np.full((3, 2), t, np.float32)}, np.zeros((3, 1)), np.zeros(3), np.zeros(3),
                np.arange(3) + 10 * t, np.zeros(3, bool))
    buf.finish(np.zeros(3), np.zeros(3, bool), 0.99, 0.95)
    seen = np.concatenate([mb.obs["obs"][:, 0].numpy() for mb in buf.minibatches(5, "cpu", np.random.default_rng(0))])
    assert sorted(seen.tolist()) == sorted(np.repeat(np.arange(4), 3).tolist())


def test_update_moves_the_policy_within_the_clip_and_reports_stats():
    torch.manual_seed(0)
    env = _pendulum(2)
    cfg = PPOConfig(num_steps=128, batch_size=32, num_epochs=4, num_envs=2, learning_rate=3e-3)
    trainer = PPOTrainer(MLPActorCritic.for_env(env), env, cfg, seed=0)
    buffer = RolloutBuffer(trainer.rollout_len, 2, trainer.adapter.fields(), trainer.action_dim)
    trainer.collect_rollouts(buffer)
    assert trainer.global_step == 128
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    stats = trainer.update(buffer)
    assert trainer.updates == 1 and stats["epochs"] == 4
    assert all(np.isfinite(v) for v in stats.values())
    assert 0 <= stats["clip_fraction"] <= 1 and stats["approx_kl"] >= -1e-6
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    env.close()


def test_target_kl_stops_the_epochs_early():
    torch.manual_seed(0)
    env = _pendulum(2)
    cfg = PPOConfig(num_steps=128, batch_size=16, num_epochs=10, num_envs=2, learning_rate=0.05, target_kl=1e-4)
    trainer = PPOTrainer(MLPActorCritic.for_env(env), env, cfg, seed=0)
    buffer = RolloutBuffer(trainer.rollout_len, 2, trainer.adapter.fields(), trainer.action_dim)
    trainer.collect_rollouts(buffer)
    assert trainer.update(buffer)["epochs"] < 10
    env.close()


def test_freeze_encoders_trains_only_fusion_and_heads():
    model = DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32, max_text_length=32))
    env = FixedLatencyEnv(step_seconds=0.0, image_size=32, max_episode_steps=5)
    cfg = PPOConfig(num_steps=16, batch_size=8, num_epochs=1, freeze_encoders=True)
    trainer = PPOTrainer(model, env, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train(16)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed, "nothing was trained"
    assert not any(k.startswith(("vision", "text")) for k in changed)
    assert any(k.startswith("policy_head") for k in changed)


def test_checkpoint_roundtrip_restores_weights_optimiser_counters_and_rng(tmp_path):
    torch.manual_seed(0)
    env = _pendulum(2)
    cfg = PPOConfig(num_steps=64, batch_size=32, num_epochs=2, num_envs=2)
    trainer = PPOTrainer(MLPActorCritic.for_env(env), env, cfg, seed=3)
    trainer.train(128, save_dir=tmp_path)
    ckpt = TrainingCheckpoint(tmp_path)
    assert ckpt.exists()
    saved = ckpt.load()
    assert saved["global_step"] == 128 and saved["updates"] == 2

    fresh = PPOTrainer(MLPActorCritic.for_env(env), env, cfg, seed=3)
    fresh.load_state_dict(saved)
    for (k, a), b in zip(trainer.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh.global_step == 128 and fresh.updates == 2
    assert fresh.optimizer.state_dict()["state"][0]["step"] == trainer.optimizer.state_dict()["state"][0]["step"]
    # The RNG streams continue where the saved run stood.
    state = saved["rng"]["trainer"]
    g = np.random.default_rng()
    g.bit_generator.state = state
    assert fresh.rng.integers(1 << 30) == g.integers(1 << 30)
    env.close()


def test_checkpoint_with_another_key_is_not_resumed(tmp_path):
    TrainingCheckpoint(tmp_path, key="a").save({"global_step": 5})
    assert TrainingCheckpoint(tmp_path, key="a").load() == {"global_step": 5}
    assert TrainingCheckpoint(tmp_path, key="b").load() is None
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert TrainingCheckpoint(tmp_path, key="a").load() is None


def test_train_resumes_at_the_saved_step_count(tmp_path):
    torch.manual_seed(0)
    env = _pendulum(2)
    cfg = PPOConfig(num_steps=64, batch_size=32, num_epochs=1, num_envs=2)
    PPOTrainer(MLPActorCritic.for_env(env), env, cfg).train(128, save_dir=tmp_path)
    steps: list[float] = []
    resumed = PPOTrainer(MLPActorCritic.for_env(env), env, cfg)
    resumed.train(256, save_dir=tmp_path, callback=lambda s: steps.append(s["global_step"]))
    assert steps == [192.0, 256.0]  # continued from 128, not from 0
    assert TrainingCheckpoint(tmp_path).load()["global_step"] == 256
    env.close()


def test_async_collection_needs_env_constructors():
    env = _pendulum(1)
    with pytest.raises(ValueError, match="env constructors"):
        PPOTrainer(MLPActorCritic.for_env(env), env, PPOConfig(num_steps=64, batch_size=32, async_collection=True))
    env.close()


def test_value_warmup_trains_the_critic_only():
    torch.manual_seed(0)
    env = _pendulum(2)
    cfg = PPOConfig(num_steps=64, batch_size=32, num_epochs=2, num_envs=2, value_warmup_steps=64)
    trainer = PPOTrainer(MLPActorCritic.for_env(env), env, cfg)
    policy_before = [p.clone() for p in trainer.model.policy_head.parameters()]
    value_before = [p.clone() for p in trainer.model.value_head.parameters()]
    seen = []
    trainer.train(64, callback=seen.append)
    assert seen[-1]["value_warmup"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(policy_before, trainer.model.policy_head.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(value_before, trainer.model.value_head.parameters()))
    trainer.train(128, callback=seen.append)  # past the warm-up: the policy moves too
    assert seen[-1]["value_warmup"] == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(policy_before, trainer.model.policy_head.parameters()))
    env.close()


def test_value_warmup_leaves_a_shared_trunk_alone():
    model = DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32, max_text_length=32))
    env = FixedLatencyEnv(step_seconds=0.0, image_size=32, max_episode_steps=5)
    trainer = PPOTrainer(model, env, PPOConfig(num_steps=16, batch_size=8, num_epochs=1, value_warmup_steps=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train(16)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("value_head") for k in changed)


@pytest.mark.parametrize("freeze_encoders", [False, True])
def test_critic_fusion_warmup_fits_the_critic_and_leaves_the_policy_exactly_alone(freeze_encoders):
    torch.manual_seed(0)
    model = DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32, max_text_length=32))
    env = FixedLatencyEnv(step_seconds=0.0, image_size=32, max_episode_steps=5)
    cfg = PPOConfig(num_steps=16, batch_size=8, num_epochs=2, value_warmup_steps=16, critic_fusion=True,
                    freeze_encoders=freeze_encoders)
    trainer = PPOTrainer(model, env, cfg)
    assert model.config.critic_fusion and model.critic_fusion is not None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train(16)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    # The critic's own fusion trains with the value head; the policy's fusion stays as it was.
    assert any(k.startswith("critic_fusion") for k in changed)
    assert changed and all(k.startswith(("value_head", "critic_fusion")) for k in changed)
    trainer.train(32)  # past the warm-up: the policy's fusion moves too
    assert any(k.startswith("fusion") for k, v in model.state_dict().items() if not torch.equal(before[k], v))
    env.close()


def test_critic_fusion_starts_as_the_shared_one_and_is_saved(tmp_path):
    torch.manual_seed(0)
    model = DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32, max_text_length=32)).eval()
    inputs = (torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8), torch.randn(3, 8),
              model.tokenize(["follow the lane", "stop", "turn left"]))
    with torch.no_grad():
        shared = model(*inputs)
        model.add_critic_fusion()
        model.add_critic_fusion()  # a no-op the second time
        separate = model(*inputs)
    # A copy of the policy's fusion: every output is unchanged at the start.
    torch.testing.assert_close(separate.value, shared.value)
    torch.testing.assert_close(separate.action_params[0], shared.action_params[0])
    with torch.no_grad():
        model.critic_fusion.norm.bias.add_(1.0)  # now it is the critic's own
        moved = model(*inputs)
    assert not torch.allclose(moved.value, shared.value)
    torch.testing.assert_close(moved.action_params[0], shared.action_params[0])
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DrivingVLA.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.critic_fusion
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs).value, moved.value)


def _one_update(compile: bool | None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    env = _pendulum(2)
    cfg = PPOConfig(num_steps=64, batch_size=32, num_epochs=2, num_envs=2, compile=compile)
    trainer = PPOTrainer(MLPActorCritic.for_env(env), env, cfg, seed=0)
    buffer = RolloutBuffer(trainer.rollout_len, 2, trainer.adapter.fields(), trainer.action_dim)
    trainer.collect_rollouts(buffer)
    stats = trainer.update(buffer)
    env.close()
    return stats, trainer.model.state_dict()


# Inductor imports torch's own TorchScript modules (mkldnn), which warn about TorchScript.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_update_matches_the_eager_one():
    """``compile=True`` runs the update's forward through torch.compile (inductor, even on CPU)
    and lands on the eager update's weights; ``None`` leaves CPU eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_stats, eager = _one_update(None)
    assert counters["frames"]["ok"] == 0  # None: off on CPU
    compiled_stats, compiled = _one_update(True)
    assert counters["frames"]["ok"] >= 1
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-6, rtol=1e-5)
    assert compiled_stats["policy_loss"] == pytest.approx(eager_stats["policy_loss"], abs=1e-6)
    torch._dynamo.reset()


def test_a_world_of_one_trains_as_without_dist(tmp_path):
    """``dist=Distributed()`` (no torchrun) is a one-process run: same seeds, steps and weights."""
    from stages.accel import Distributed
    from stages.rl.ppo import rank_seed

    assert rank_seed(7, None) == rank_seed(7, Distributed()) == 7
    assert rank_seed(7, Distributed(rank=2, local_rank=0, world_size=4)) == 2007
    results = []
    for dist in (None, Distributed()):
        torch.manual_seed(0)
        env = _pendulum(2)
        cfg = PPOConfig(num_steps=64, batch_size=32, num_epochs=2, num_envs=2, target_kl=0.5)
        trainer = PPOTrainer(MLPActorCritic.for_env(env), env, cfg, seed=3, dist=dist)
        trainer.train(128, save_dir=tmp_path / str(dist is None))
        results.append((trainer.global_step, trainer.model.state_dict()))
        env.close()
    (steps_a, a), (steps_b, b) = results
    assert steps_a == steps_b == 128
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert TrainingCheckpoint(tmp_path / "False").load()["global_step"] == 128
