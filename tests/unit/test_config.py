import pytest
import yaml

from stages.config import PRESETS, ConfigError, build_config, load_config, parse_override


def test_presets_validate():
    for name in PRESETS:
        cfg = build_config(preset=name)
        assert cfg.preset == name


def test_layers_apply_in_order(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preset": "smoke", "pretrain": {"epochs": 3}, "online": {"ppo": {"gae_lambda": 0.9}}}))
    cfg = load_config(params, overrides=["pretrain.epochs=5", "online.ppo.learning_rate=1e-3"])
    assert cfg.preset == "smoke"
    assert cfg.pretrain.epochs == 5            # --set beats params.yaml
    assert cfg.online.ppo.gae_lambda == 0.9    # params.yaml beats the preset
    assert cfg.online.ppo.learning_rate == 1e-3
    assert cfg.data.episodes == PRESETS["smoke"]["data"]["episodes"]  # the preset beats the defaults


def test_preset_from_override_wins(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("preset: demo\n")
    assert load_config(params, overrides=["preset=smoke"]).preset == "smoke"


@pytest.mark.parametrize("override, key, fragment", [
    ("online.ppo.gamma=1.5", "online.ppo.gamma", "less than or equal to 1"),
    ("online.ppo.clip_epsilon=-0.1", "online.ppo.clip_epsilon", "greater than 0"),
    ("model.size=huge", "model.size", "'tiny', 'small' or 'base'"),
    ("env.scenario=moon", "env.scenario", "moon"),
    ("pretrain.epochz=3", "pretrain.epochz", "unknown key"),
    ("data.episodes=many", "data.episodes", "valid integer"),
])
def test_bad_values_name_key_value_and_rule(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        build_config(preset="smoke", overrides=[override])
    message = str(info.value)
    assert key in message
    assert fragment in message


def test_cross_field_rule_is_explained():
    with pytest.raises(ConfigError, match="must be a multiple of num_envs"):
        build_config(preset="smoke", overrides=["online.ppo.num_steps=33", "online.ppo.num_envs=2"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="allowed presets"):
        build_config(preset="fast")


def test_malformed_override_and_params(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("online.total_timesteps")
    bad = tmp_path / "params.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_override_values_are_typed():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}
    assert parse_override("a.b=true") == {"a": {"b": True}}


def test_offline_critic_and_online_rl_share_one_discount():
    with pytest.raises(ConfigError, match="offline.iql_gamma=0.99 differs from online.ppo.gamma=0.9"):
        build_config(preset="smoke", overrides=["online.ppo.gamma=0.9"])
    cfg = build_config(preset="smoke", overrides=["online.ppo.gamma=0.9", "offline.iql_gamma=0.9"])
    assert cfg.offline.iql_gamma == cfg.online.ppo.gamma == 0.9


def test_a_partial_learner_section_keeps_the_stage_defaults_for_the_rest():
    """Setting one `online.sac` / `online.ppo` key must not bring back the learner classes' own defaults
    for the others (a 1M-step replay buffer, random warm-up, SAC's update-to-data ratio of 1)."""
    from stages.config import PPO_STAGE_DEFAULTS, SAC_STAGE_DEFAULTS, OnlineParams

    online = OnlineParams(sac={"num_envs": 2}, ppo={"num_envs": 2})
    assert online.sac.num_envs == 2 and online.ppo.num_envs == 2
    assert {k: getattr(online.sac, k) for k in SAC_STAGE_DEFAULTS} == SAC_STAGE_DEFAULTS
    assert {k: getattr(online.ppo, k) for k in PPO_STAGE_DEFAULTS} == PPO_STAGE_DEFAULTS
    # Through a preset and a --set: the preset's keys, the stage's defaults for the rest, the override.
    cfg = build_config(preset="smoke", overrides=["online.sac.num_envs=2"])
    assert (cfg.online.sac.num_envs, cfg.online.sac.buffer_size, cfg.online.sac.utd_ratio,
            cfg.online.sac.random_warmup) == (2, 256, 0.25, False)
    # Explicit keys still win over the stage's defaults.
    assert OnlineParams(sac={"random_warmup": True}).sac.random_warmup is True


@pytest.mark.parametrize("override, key", [
    ("offline.learning_rate=nan", "offline.learning_rate"),
    ("offline.learning_rate=inf", "offline.learning_rate"),
    ("offline.learning_rate=-.inf", "offline.learning_rate"),   # YAML's own infinity: a float, not text
    ("online.ppo.gamma=nan", "online.ppo.gamma"),               # nested, and under a cross-section rule
    ("env.reward.target_speed=nan", "env.reward.target_speed"),  # two levels down
    ("env.view_distance=inf", "env.view_distance"),             # optional float
    ("data.episodes=inf", "data.episodes"),                     # an int field
    ("carla.ready_timeout_s=nan", "carla.ready_timeout_s"),     # the infra section
    ("promote.max_drop.route_completion=nan", "promote.max_drop.route_completion"),  # a dict of floats
])
def test_non_finite_numbers_are_refused_as_such(override, key):
    """NaN compares false with everything, so a range rule alone would call `nan` "not <= 1" (or let it
    through): every numeric field refuses NaN and infinity first, saying so, naming key and value."""
    with pytest.raises(ConfigError) as info:
        build_config(preset="smoke", overrides=[override])
    message = str(info.value)
    assert f"{key} = " in message
    assert "not a finite number" in message
    assert override.partition("=")[2].lstrip("-.") in message.lower()   # the value given
    assert "less than" not in message and "greater than" not in message   # no range rule on a NaN
    assert "differs from" not in message   # nor a cross-field rule built on it


def test_non_finite_numbers_in_params_yaml_and_direct_construction(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("preset: smoke\noffline:\n  weight_decay: .nan\n")
    with pytest.raises(ConfigError, match=r"offline.weight_decay = nan: not a finite number"):
        load_config(params)
    # The section models refuse it too, whoever builds them.
    from pydantic import ValidationError

    from stages.rl.configs import PPOConfig

    with pytest.raises(ValidationError, match="finite number"):
        PPOConfig(learning_rate=float("nan"))
