"""Unit tests of models/: config, tokenizer, DrivingVLA, persistence and the export wrapper (tiny, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from models import (
    ACTION_HIGH,
    ACTION_LOW,
    SIZE_PRESETS,
    ByteTokenizer,
    DeterministicPolicy,
    DrivingVLA,
    DrivingVLAConfig,
    DrivingVLAOutput,
)

COMMANDS = ["follow the lane", "turn left at the next intersection", "stop", "é 🚗"]


def make_inputs(
    cfg: DrivingVLAConfig, batch: int, seed: int = 0, cameras_axis: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cameras_axis = cfg.num_cameras > 1 if cameras_axis is None else cameras_axis
    shape = (batch, cfg.num_cameras) if cameras_axis else (batch,)
    image = torch.randint(0, 256, (*shape, cfg.image_size, cfg.image_size, 3), generator=g, dtype=torch.uint8)
    state = torch.randn(batch, cfg.state_dim, generator=g)
    tokens = ByteTokenizer(cfg.max_text_length).encode([COMMANDS[i % len(COMMANDS)] for i in range(batch)])
    return image, state, tokens


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny() -> DrivingVLA:
    torch.manual_seed(0)
    return DrivingVLA(DrivingVLAConfig.from_size("tiny")).eval()


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_from_size(size: str) -> None:
    cfg = DrivingVLAConfig.from_size(size)
    for key, value in SIZE_PRESETS[size].items():
        assert getattr(cfg, key) == value
    assert cfg.action_dim == 3 and cfg.trajectory_length == 10 and cfg.policy == "squashed_gaussian"
    assert DrivingVLAConfig.from_size(size, num_cameras=2, policy="beta").num_cameras == 2


def test_default_config_is_base() -> None:
    # The seed documents build DrivingVLAConfig(num_cameras=1, image_size=224, action_dim=3).
    assert DrivingVLAConfig(num_cameras=1, image_size=224, action_dim=3) == DrivingVLAConfig.from_size("base")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"image_size": 60}, ["image_size", "patch_size", "divisible"]),
        ({"hidden_dim": 66}, ["hidden_dim", "num_heads", "divisible"]),
        ({"action_dim": 2}, ["action_dim", "must be 3"]),
        ({"num_cameras": 0}, ["num_cameras", "greater than or equal to 1"]),
        ({"policy": "gaussian"}, ["policy", "squashed_gaussian"]),
        ({"dropout": 1.5}, ["dropout", "less than 1"]),
        ({"max_text_length": 1}, ["max_text_length"]),
        ({"hidden_size": 64}, ["hidden_size", "Extra inputs are not permitted"]),
    ],
)
def test_config_validation_names_field_and_reason(overrides: dict, words: list[str]) -> None:
    with pytest.raises(ValidationError) as err:
        DrivingVLAConfig.from_size("tiny", **overrides)
    for word in words:
        assert word in str(err.value)


def test_unknown_size() -> None:
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        DrivingVLAConfig.from_size("huge")


def test_config_json_round_trip() -> None:
    cfg = DrivingVLAConfig.from_size("small", policy="beta", num_cameras=3)
    assert DrivingVLAConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_parameter_counts() -> None:
    counts = {}
    for size in SIZE_PRESETS:
        with torch.device("meta"):  # no memory, no init cost: base is counted without being built
            counts[size] = DrivingVLA(DrivingVLAConfig.from_size(size)).count_parameters()
    assert counts["tiny"] < counts["small"] < counts["base"]
    assert 100e6 < counts["base"] < 250e6  # a ViT-B/16 tower plus text and fusion transformers


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_encode_decode() -> None:
    tok = ByteTokenizer(16)
    ids = tok.encode(["hi", "é"])
    assert ids.dtype == torch.long and ids.shape == (2, 16)
    assert ids[0, :4].tolist() == [1, ord("h") + 3, ord("i") + 3, 2]
    assert (ids[0, 4:] == 0).all()
    assert ids.max() <= 258
    assert tok.decode(ids) == ["hi", "é"]
    assert tok.decode(ids[0]) == "hi"


def test_tokenizer_truncation_keeps_eos() -> None:
    tok = ByteTokenizer(8)
    ids = tok.encode(["a much longer command than fits"])
    assert ids.shape == (1, 8)
    assert ids[0, 0] == 1 and ids[0, -1] == 2 and (ids[0] != 0).all()
    assert tok.decode(ids[0]) == "a much"


def test_tokenizer_save_load(tmp_path: Path) -> None:
    tok = ByteTokenizer(32)
    tok.save(tmp_path)
    assert ByteTokenizer.load(tmp_path) == tok
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ByteTokenizer.load(tmp_path / "missing")


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("policy", ["squashed_gaussian", "beta"])
@pytest.mark.parametrize("num_cameras", [1, 2])
def test_forward_shapes(policy: str, num_cameras: int) -> None:
    cfg = DrivingVLAConfig.from_size("tiny", num_cameras=num_cameras, policy=policy)
    model = DrivingVLA(cfg).eval()
    out = model(*make_inputs(cfg, batch=2))
    assert isinstance(out, DrivingVLAOutput)
    assert [p.shape for p in out.action_params] == [(2, 3), (2, 3)]
    assert out.trajectory.shape == (2, cfg.trajectory_length, 2)
    assert out.value.shape == (2,)
    assert out.features.shape == (2, cfg.hidden_dim)
    assert all(torch.isfinite(t).all() for t in (*out.action_params, out.trajectory, out.value))

    action, log_prob, value = model.act(*make_inputs(cfg, batch=2))
    low, high = torch.tensor(ACTION_LOW), torch.tensor(ACTION_HIGH)
    assert action.shape == (2, 3) and ((action >= low) & (action <= high)).all()
    assert log_prob.shape == (2,) and value.shape == (2,)
    log_prob, entropy, value = model.evaluate_actions(*make_inputs(cfg, batch=2), action)
    assert log_prob.shape == entropy.shape == value.shape == (2,)


def test_single_camera_accepts_both_layouts(tiny: DrivingVLA) -> None:
    image, state, tokens = make_inputs(tiny.config, batch=2)
    out = tiny(image, state, tokens)
    out5 = tiny(image.unsqueeze(1), state, tokens)
    assert torch.equal(out.features, out5.features)


def test_rejects_bad_shapes(tiny: DrivingVLA) -> None:
    image, state, tokens = make_inputs(tiny.config, batch=2)
    with pytest.raises(ValueError, match="image must be uint8"):
        tiny(image[:, :32], state, tokens)
    with pytest.raises(ValueError, match="max_text_length"):
        tiny(image, state, torch.ones(2, tiny.config.max_text_length + 1, dtype=torch.long))
    two = DrivingVLA(DrivingVLAConfig.from_size("tiny", num_cameras=2))
    with pytest.raises(ValueError, match="num_cameras is 2"):
        two(image, state, tokens)


@pytest.mark.parametrize("num_cameras", [1, 2])
def test_batch_size_independence(num_cameras: int) -> None:
    cfg = DrivingVLAConfig.from_size("tiny", num_cameras=num_cameras)
    model = DrivingVLA(cfg).eval()
    inputs = make_inputs(cfg, batch=4)
    batched = model(*inputs)
    for i in range(4):
        alone = model(*(t[i : i + 1] for t in inputs))
        for got, want in zip(
            (*alone.action_params, alone.trajectory, alone.value, alone.features),
            (*batched.action_params, batched.trajectory, batched.value, batched.features),
        ):
            torch.testing.assert_close(got[0], want[i], atol=1e-5, rtol=0)


def test_padding_only_tokens_are_finite(tiny: DrivingVLA) -> None:
    image, state, tokens = make_inputs(tiny.config, batch=2)
    out = tiny(image, state, torch.zeros_like(tokens))
    assert torch.isfinite(out.features).all()


def test_trajectory_is_constant_velocity_prior_plus_cumulative_offsets(tiny: DrivingVLA) -> None:
    image, state, tokens = make_inputs(tiny.config, batch=2)
    state[:, 0] = torch.tensor([5.0, 10.0])
    features = tiny.compute_features(image, state, tokens)
    offsets = tiny.trajectory_head(torch.cat([features, state], dim=-1)).reshape(2, -1, 2)
    t = tiny.config.waypoint_seconds * torch.arange(1, tiny.config.trajectory_length + 1)
    prior = torch.stack([state[:, :1] * t, torch.zeros(2, len(t))], dim=-1)
    torch.testing.assert_close(tiny.predict_trajectory(features, state), offsets.cumsum(1) + prior)
    # A zero head is exactly the constant-velocity baseline: 5 m/s → 1.5 m after 0.3 s.
    torch.nn.init.zeros_(tiny.trajectory_head.fc2.weight)
    torch.nn.init.zeros_(tiny.trajectory_head.fc2.bias)
    torch.testing.assert_close(tiny.predict_trajectory(features, state), prior)
    assert prior[0, 0, 0].item() == pytest.approx(5.0 * tiny.config.waypoint_seconds)


def test_contrastive_embeddings(tiny: DrivingVLA) -> None:
    image, _, tokens = make_inputs(tiny.config, batch=3)
    img, txt = tiny.encode_image(image), tiny.encode_text(tokens)
    assert img.shape == txt.shape == (3, tiny.config.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert tiny.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert tiny.contrastive_logits(img, txt).shape == (3, 3)
    assert torch.equal(tiny.tokenize(["stop"]), tiny.tokenizer.encode(["stop"]))


def test_every_parameter_gets_a_gradient() -> None:
    """All parameters are used, so DDP needs no find_unused_parameters."""
    cfg = DrivingVLAConfig.from_size("tiny", num_cameras=2)
    model = DrivingVLA(cfg).train()
    image, state, tokens = make_inputs(cfg, batch=2)
    out = model(image, state, tokens)
    actions = model.distribution(out.action_params).rsample()
    log_prob = model.distribution(out.action_params).log_prob(actions.detach())
    logits = model.contrastive_logits(model.encode_image(image), model.encode_text(tokens))
    loss = log_prob.sum() + out.trajectory.sum() + out.value.sum() + logits.logsumexp(-1).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize("policy", ["squashed_gaussian", "beta"])
def test_save_and_load_round_trip(tmp_path: Path, policy: str) -> None:
    cfg = DrivingVLAConfig.from_size("tiny", policy=policy, max_text_length=24)
    model = DrivingVLA(cfg).eval()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}

    loaded = DrivingVLA.from_pretrained(tmp_path, map_location="cpu")
    assert loaded.config == cfg and not loaded.training
    assert loaded.tokenizer == model.tokenizer and loaded.tokenizer.max_length == 24
    inputs = make_inputs(cfg, batch=2)
    a, b = model(*inputs), loaded(*inputs)
    for x, y in zip((*a.action_params, a.trajectory, a.value, a.features),
                    (*b.action_params, b.trajectory, b.value, b.features)):
        assert torch.equal(x, y)
    assert torch.equal(model.encode_text(inputs[2]), loaded.encode_text(inputs[2]))


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_from_pretrained_names_missing_file(tmp_path: Path, tiny: DrivingVLA, missing: str) -> None:
    tiny.save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        DrivingVLA.from_pretrained(tmp_path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not what was saved" * 30)


@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "garbage"])
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_from_pretrained_names_a_corrupt_file_and_how_to_get_it_back(tmp_path: Path, tiny: DrivingVLA,
                                                                      name: str, damage) -> None:
    from models.driving_vla import CheckpointFileError

    tiny.save_pretrained(tmp_path)
    damage(tmp_path / name)
    with pytest.raises(CheckpointFileError) as err:
        DrivingVLA.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path / name) in message
    assert "re-run the stage" in message and "dvc checkout" in message and "dvc pull" in message


def test_from_pretrained_names_weights_of_another_model(tmp_path: Path, tiny: DrivingVLA) -> None:
    from models.driving_vla import CheckpointFileError

    tiny.save_pretrained(tmp_path)
    other = DrivingVLA(DrivingVLAConfig.from_size("tiny", trajectory_length=tiny.config.trajectory_length + 1))
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointFileError, match="model.safetensors is truncated, corrupt or of another model"):
        DrivingVLA.from_pretrained(tmp_path)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("policy", ["squashed_gaussian", "beta"])
def test_deterministic_policy_is_mode_and_trajectory(policy: str) -> None:
    cfg = DrivingVLAConfig.from_size("tiny", policy=policy)
    model = DrivingVLA(cfg).eval()
    inputs = make_inputs(cfg, batch=3)
    controls, trajectory = DeterministicPolicy(model)(*inputs)
    out = model(*inputs)
    assert torch.equal(controls, model.distribution(out.action_params).mode())
    assert torch.equal(trajectory, out.trajectory)
    action, _, _ = model.act(*inputs, deterministic=True)
    assert torch.equal(controls, action)


def test_torch_export_with_dynamic_batch(tiny: DrivingVLA) -> None:
    policy = DeterministicPolicy(tiny).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(
        policy,
        make_inputs(tiny.config, batch=2),
        dynamic_shapes={"image": {0: batch}, "state": {0: batch}, "tokens": {0: batch}},
    )
    for n in (1, 5):
        inputs = make_inputs(tiny.config, batch=n, seed=n)
        got, want = exported.module()(*inputs), policy(*inputs)
        assert got[0].shape == (n, 3) and got[1].shape == (n, tiny.config.trajectory_length, 2)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# Both warnings come from torch's own exporter internals, not from the model.
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*axis name.*:UserWarning")
def test_onnx_export_with_dynamic_batch(tmp_path: Path, tiny: DrivingVLA) -> None:
    """The dynamo ONNX exporter accepts the policy and onnxruntime reproduces it at another batch size."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    policy = DeterministicPolicy(tiny).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        policy,
        make_inputs(tiny.config, batch=2),
        dynamic_shapes={"image": {0: batch}, "state": {0: batch}, "tokens": {0: batch}},
        dynamo=True,
        verbose=False,
    )
    program.save(str(tmp_path / "policy.onnx"))
    session = ort.InferenceSession(str(tmp_path / "policy.onnx"), providers=["CPUExecutionProvider"])
    inputs = make_inputs(tiny.config, batch=3, seed=3)
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    for g, w in zip(got, policy(*inputs)):
        torch.testing.assert_close(torch.from_numpy(g), w.detach(), atol=1e-4, rtol=1e-4)


def test_ignored_state_entries_do_not_change_any_output(tmp_path: Path) -> None:
    # The last action in the state lets imitation copy it (copycat): the model can be told to read it as zero.
    cfg = DrivingVLAConfig.from_size("tiny", ignored_state=[3, 4, 5])
    model = DrivingVLA(cfg).eval()
    image, state, tokens = make_inputs(cfg, batch=3)
    changed = state.clone()
    changed[:, [3, 4, 5]] += 7.0
    a, b = model(image, state, tokens), model(image, changed, tokens)
    for x, y in [(a.features, b.features), (a.trajectory, b.trajectory), (a.value, b.value)]:
        torch.testing.assert_close(x, y)
    changed[:, 1] += 1.0     # a read entry still matters
    assert not torch.allclose(model(image, changed, tokens).features, a.features)
    model.save_pretrained(tmp_path)
    again = DrivingVLA.from_pretrained(tmp_path).eval()
    assert again.config.ignored_state == [3, 4, 5]
    torch.testing.assert_close(again(image, changed, tokens).features, model(image, changed, tokens).features)
    with pytest.raises(ValidationError, match="ignored_state"):
        DrivingVLAConfig.from_size("tiny", ignored_state=[8])
