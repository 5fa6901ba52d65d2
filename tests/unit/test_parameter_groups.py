"""The models name their own parameter groups: every trainer asks them, none selects by name prefixes."""
import torch

from models import DrivingVLA, DrivingVLAConfig
from stages.rl.policies import MLPActorCritic
from stages.rl.sac_networks import MLPActor


def _model() -> DrivingVLA:
    return DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32, max_text_length=32))


def test_driving_vla_groups_partition_its_parameters_in_order():
    model = _model()
    model.add_critic_fusion()
    groups = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    order = list(names)
    assert sorted(id(p) for g in groups.values() for p in g) == sorted(order)  # each parameter once
    for group in groups.values():
        ids = [id(p) for p in group]
        assert ids == sorted(ids, key=order.index)  # named_parameters order within a group
    top = {g: {names[id(p)].split(".")[0] for p in ps} for g, ps in groups.items()}
    assert top["encoders"] == {"vision", "text", "image_projection", "text_projection", "logit_scale"}
    assert top["actor"] == {"policy_head"} and top["critic"] == {"value_head", "critic_fusion"}
    assert {"fusion", "state_encoder", "trajectory_head"} <= top["trunk"]


def test_freeze_encoders_freezes_exactly_the_encoders():
    model = _model()
    frozen = model.freeze_encoders()
    encoders = {id(p) for p in model.encoder_parameters()}
    assert frozen == sum(p.numel() for p in model.encoder_parameters()) > 0
    assert all(p.requires_grad == (id(p) not in encoders) for p in model.parameters())


def test_mlp_models_have_an_actor_and_no_encoders():
    ac = MLPActorCritic(3, [-1.0], [1.0])
    groups = ac.parameter_groups()
    assert groups["actor"][-1] is ac.log_std
    assert {id(p) for p in groups["critic"]} == {id(p) for p in ac.value_head.parameters()}
    actor = MLPActor(3, [-1.0], [1.0], hidden_dim=8)
    assert [id(p) for p in actor.parameter_groups()["actor"]] == [id(p) for p in actor.policy_head.parameters()]
    for m in (ac, actor):
        assert m.freeze_encoders() == 0 and m.encoder_parameters() == []
        assert all(p.requires_grad for p in m.parameters())
    assert isinstance(groups["trunk"], list) and not groups["trunk"]
    torch.testing.assert_close(ac.log_std.detach(), torch.zeros(1))
