"""Env slots: with CARLA every env of the online stage connects to a server of its own.

Train env i of rank r is slot r * num_envs + i, rank 0's evaluation env the slot after them; slot k
uses endpoint k of ``DRIVEVLA_CARLA_SERVERS``. The bridges here are built, not connected (no server
is needed to read which endpoint an env was given).
"""
from __future__ import annotations

import pickle

import pytest

from infra.carla import ENV_VAR, FILE_ENV_VAR, CarlaEndpoint, endpoints_to_env
from stages.config import load_config
from stages.envs import EnvConfig, make_env
from stages.envs.factory import check_env_slots, env_fns
from stages.envs.slots import EnvSlotError, OnlineEnvSlots

CARLA = EnvConfig(backend="carla")


def endpoint(index: int, port: int, host: str = "localhost", generation: int = 0) -> CarlaEndpoint:
    return CarlaEndpoint(index=index, host=host, port=port, streaming_port=port + 1, secondary_port=port + 2,
                         tm_port=port + 3, gpu=None, name=f"carla-{index}", container_id="", generation=generation)


@pytest.fixture
def publish(monkeypatch):
    """Publish ``n`` endpoints (server k on port 3000 + 4k) the way the CARLA resource does."""
    monkeypatch.delenv(FILE_ENV_VAR, raising=False)

    def publish(n: int) -> list[CarlaEndpoint]:
        endpoints = [endpoint(k, 3000 + 4 * k) for k in range(n)]
        monkeypatch.setenv(ENV_VAR, endpoints_to_env(endpoints))
        return endpoints
    return publish


@pytest.fixture
def unpublished(monkeypatch):
    for name in (ENV_VAR, FILE_ENV_VAR):
        monkeypatch.delenv(name, raising=False)


def test_layout_of_train_and_evaluation_slots():
    slots = OnlineEnvSlots(num_envs=3, world_size=2)
    assert [slots.first_train(r) for r in range(2)] == [0, 3]
    assert slots.eval == 6 and slots.total == 7
    assert OnlineEnvSlots(num_envs=1).total == 2            # one env still needs a second server to evaluate
    with pytest.raises(ValueError, match="rank 2"):
        slots.first_train(2)


def test_layout_follows_the_algorithm_of_the_config():
    cfg = load_config(None, preset="carla", overrides=["online.sac.num_envs=2"])
    assert OnlineEnvSlots.for_config(cfg.online, world_size=2).total == 4 * 2 + 1     # ppo: 4 envs per rank
    sac = load_config(None, preset="carla", overrides=["online.algo=sac", "online.sac.num_envs=2"])
    slots = OnlineEnvSlots.for_config(sac.online, world_size=1)
    assert slots.total == 3 and "online.sac.num_envs=2" in slots.describe()


def test_every_rank_and_the_evaluation_env_get_their_own_server(publish):
    slots = OnlineEnvSlots(num_envs=2, world_size=3)
    endpoints = publish(slots.total)
    check_env_slots(CARLA, slots.total, slots.describe())
    seen: dict[int, tuple[str, int, int]] = {}
    for rank in range(slots.world_size):
        for fn in env_fns(CARLA, slots.num_envs, seed=10 * rank, first_slot=slots.first_train(rank)):
            fn = pickle.loads(pickle.dumps(fn))            # as an async worker process receives it
            env = fn()
            seen[env.config.server_slot] = (env.config.carla_host, env.config.carla_port, env.config.tm_port)
            env.close()
    evaluation = make_env(CARLA, seed=1, slot=slots.eval)
    seen[evaluation.config.server_slot] = (evaluation.config.carla_host, evaluation.config.carla_port,
                                           evaluation.config.tm_port)
    evaluation.close()
    assert seen == {e.index: (e.host, e.port, e.tm_port) for e in endpoints}
    assert seen[slots.first_train(1)] == ("localhost", 3008, 3011)   # rank 1's first env: slot 2


def test_too_few_servers_fail_before_any_env_is_built(publish):
    slots = OnlineEnvSlots(num_envs=2, world_size=3, setting="online.ppo.num_envs")
    publish(slots.total - 1)
    with pytest.raises(EnvSlotError) as err:
        check_env_slots(CARLA, slots.total, slots.describe())
    text = str(err.value)
    assert "7 CARLA servers are needed" in text and "lists 6" in text and "carla.num_servers=7" in text
    assert "online.ppo.num_envs=2 train env(s) per rank x 3 rank(s) + 1 evaluation env" in text
    with pytest.raises(EnvSlotError, match="env slot 6 has no CARLA server"):
        make_env(CARLA, slot=slots.eval)


def test_without_a_server_list_one_env_may_use_carla_host(unpublished, monkeypatch):
    monkeypatch.setenv("CARLA_HOST", "carla-9")
    monkeypatch.setenv("CARLA_PORT", "2010")
    check_env_slots(CARLA, 1)
    env = make_env(CARLA, slot=0)
    assert (env.config.carla_host, env.config.carla_port) == ("carla-9", 2010)
    env.close()
    with pytest.raises(EnvSlotError, match=f"2 CARLA servers are needed.*{ENV_VAR} is not set"):
        check_env_slots(CARLA, 2, "1 train env + 1 evaluation env")
    with pytest.raises(EnvSlotError, match="env slot 1 needs a CARLA server of its own"):
        make_env(CARLA, slot=1)


def test_the_online_stage_refuses_to_share_one_server(unpublished):
    from stages import online

    cfg = load_config(None, preset="smoke", overrides=["env.backend=carla", "device=cpu"])
    with pytest.raises(EnvSlotError, match=r"2 CARLA servers are needed, one per env \(online.ppo.num_envs=1"):
        online.run(cfg)


def test_the_highway_backend_ignores_slots(unpublished):
    cfg = EnvConfig(image_size=32)
    check_env_slots(cfg, 99)
    a = make_env(cfg, seed=3, slot=7)
    b = make_env(cfg, seed=3)
    try:
        assert (a.reset()[0]["state"] == b.reset()[0]["state"]).all()
    finally:
        a.close()
        b.close()
