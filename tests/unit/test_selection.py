"""The online stage's best-policy keeper and the policy log-std reset."""
from __future__ import annotations

import logging

import pytest
import torch

from models import DrivingVLA, DrivingVLAConfig
from stages.rl.policies import MLPActorCritic
from stages.rl.selection import BestPolicyKeeper


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_keeper_ends_with_the_best_scored_weights_and_a_resumed_run_keeps_them(tmp_path):
    model = MLPActorCritic(4, [-1, -1], [1, 1])
    scores = iter([0.5, 0.9, 0.2])          # start, after update 1, after update 2
    keeper = BestPolicyKeeper(model, lambda: next(scores), tmp_path, key="k")
    keeper.start()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    best = _weights(model).clone()
    keeper({"global_step": 10})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(5.0)
    keeper({"global_step": 20})
    out = keeper.restore()
    assert out["best_step"] == 10 and out["best_score"] == 0.9
    assert [h["step"] for h in out["history"]] == [0, 10, 20]
    assert torch.equal(_weights(model), best)

    # A run resumed with the same key takes over the best without scoring the start again...
    resumed = BestPolicyKeeper(MLPActorCritic(4, [-1, -1], [1, 1]), lambda: 0.0, tmp_path, key="k")
    resumed.start()
    assert resumed.best_score == 0.9 and len(resumed.history) == 3
    # ...while another run (another key) starts afresh.
    fresh = BestPolicyKeeper(MLPActorCritic(4, [-1, -1], [1, 1]), lambda: 0.1, tmp_path, key="other")
    fresh.start()
    assert fresh.best_score == 0.1 and fresh.best_step == 0


@pytest.mark.parametrize("damaged", ["best.safetensors", "best.json"])
def test_a_resumed_keeper_with_unreadable_best_files_scores_afresh(tmp_path, caplog, damaged):
    keeper = BestPolicyKeeper(MLPActorCritic(4, [-1, -1], [1, 1]), lambda: 0.9, tmp_path, key="k")
    keeper.start()
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated by a crash or a full disk
    model = MLPActorCritic(4, [-1, -1], [1, 1])
    resumed = BestPolicyKeeper(model, lambda: 0.3, tmp_path, key="k")
    with caplog.at_level(logging.WARNING, logger="stages.rl.selection"):
        resumed.start()
    assert str(path) in caplog.text and "scoring the starting weights afresh" in caplog.text
    assert resumed.best_score == 0.3 and resumed.best_step == 0
    start = _weights(model).clone()
    assert resumed.restore()["best_score"] == 0.3 and torch.equal(_weights(model), start)  # files rewritten


def test_keeper_scores_every_nth_callback_and_chains_the_next_one(tmp_path):
    calls, seen = [], []
    keeper = BestPolicyKeeper(MLPActorCritic(2, [-1], [1]), lambda: calls.append(1) or 0.0, tmp_path, every=2,
                              next_callback=lambda stats: seen.append(stats["global_step"]) or False)
    keeper.start()
    results = [keeper({"global_step": s}) for s in (1, 2, 3, 4)]
    assert len(calls) == 1 + 2 and seen == [1, 2, 3, 4] and results == [False] * 4


def test_set_log_std_makes_the_spread_state_independent():
    model = DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32)).eval()
    model.set_log_std(-4.0)
    features = torch.randn(5, model.config.hidden_dim)
    _, log_std = model.policy_params(features)
    assert torch.allclose(log_std, torch.full_like(log_std, -4.0))
    mlp = MLPActorCritic(3, [-1, -1], [1, 1])
    mlp.set_log_std(-2.5)
    assert torch.allclose(mlp.policy_params(torch.zeros(2, 3))[1], torch.full((2, 2), -2.5))


def test_a_keeper_that_never_scored_leaves_the_weights_alone_despite_an_earlier_runs_file(tmp_path):
    earlier = BestPolicyKeeper(MLPActorCritic(4, [-1, -1], [1, 1]), lambda: 1.0, tmp_path, key="k")
    earlier.start()     # writes best.safetensors of other weights
    model = MLPActorCritic(4, [-1, -1], [1, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = BestPolicyKeeper(model, lambda: 0.0, tmp_path, key="k")   # a fresh run that never scored
    assert fresh.restore()["best_step"] == -1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
