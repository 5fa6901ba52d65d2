"""IQL losses: the expectile, the target network, and learning on small problems with known answers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.distributions import ACTION_HIGH, ACTION_LOW, make_distribution
from stages.rl.iql import IQLConfig, IQLCritic, expectile_loss, iql_losses

LOW, HIGH = torch.tensor(ACTION_LOW), torch.tensor(ACTION_HIGH)


def test_expectile_weights_positive_errors_by_tau():
    assert expectile_loss(torch.tensor([2.0]), 0.9).item() == pytest.approx(0.9 * 4)
    assert expectile_loss(torch.tensor([-2.0]), 0.9).item() == pytest.approx(0.1 * 4)
    # The minimiser of the expectile loss over samples {0, 1} is the tau-expectile: tau for {0, 1}.
    v = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        expectile_loss(torch.tensor([0.0, 1.0]) - v, 0.8).backward()
        opt.step()
    assert v.item() == pytest.approx(0.8, abs=1e-3)


def test_target_q_moves_by_polyak_averaging():
    critic = IQLCritic(4, LOW, HIGH, hidden_dim=8)
    with torch.no_grad():
        for p in critic.q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in critic.q_target.parameters()]
    critic.update_target(0.25)
    for b, t, p in zip(before, critic.q_target.parameters(), critic.q.parameters()):
        torch.testing.assert_close(t, b + 0.25 * (p - b))
    assert not any(p.requires_grad for p in critic.q_target.parameters())


class _Agent(nn.Module):
    """Features = a one-hot state; a linear value and a squashed-Gaussian policy over them."""

    def __init__(self, n_states: int):
        super().__init__()
        self.value = nn.Linear(n_states, 1)
        self.policy = nn.Linear(n_states, 6)
        nn.init.zeros_(self.policy.weight)
        nn.init.constant_(self.policy.bias, 0.0)

    def dist(self, f):
        loc, log_std = self.policy(f).chunk(2, -1)
        return make_distribution("squashed_gaussian", (loc, log_std.clamp(-3, 1)), LOW, HIGH)


def _train(agent, critic, batch, cfg, steps=1500, lr=3e-3):
    opt = torch.optim.Adam(list(agent.parameters()) + list(critic.q.parameters()), lr=lr)
    for _ in range(steps):
        v = agent.value(batch["f"]).squeeze(-1)
        with torch.no_grad():
            v_next = agent.value(batch["f_next"]).squeeze(-1)
        logp = agent.dist(batch["f"]).log_prob(batch["a"])
        parts = iql_losses(v, v_next, batch["f"], logp, batch["a"], batch["r"], batch["done"], critic, cfg)
        loss = parts["value_loss"] + parts["q_loss"] + parts["awr_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        critic.update_target(cfg.tau)
    return parts


def test_iql_values_good_states_and_extracts_the_better_action():
    """Two states, each absorbing. In state 0 the data holds a good action (steer +0.5, reward 1) and a bad
    one (steer -0.5, reward 0), half each; state 1 (where perturbed drives end up) always pays 0.2.
    IQL must give V(0) near the value of always taking the better action (the 0.9-expectile fixed point
    V = 0.9 / (1 - gamma) = 4.5 here, against 2.5 for the data's mean and 5 for the best action), V(1) =
    0.2 / (1 - gamma), and a policy in state 0 that steers towards +0.5."""
    torch.manual_seed(0)
    gamma = 0.8
    eye = torch.eye(2)
    n = 256
    good = torch.arange(n) % 2 == 0
    state0 = torch.arange(n) < n // 2 + n // 4     # 3/4 of the data in state 0
    a = torch.tensor([0.5, 0.5, 0.1]).repeat(n, 1)
    a[~good, 1] = -0.5
    r = torch.where(good, 1.0, 0.0)
    # Absorbing: taking the bad action in state 0 leads to state 0 anyway (value of the best action persists).
    f = torch.where(state0[:, None], eye[0], eye[1])
    r = torch.where(state0, r, torch.tensor(0.2))
    a[~state0] = torch.tensor([0.5, 0.0, 0.1])
    batch = {"f": f, "f_next": f, "a": a, "r": r, "done": torch.zeros(n, dtype=torch.bool)}
    cfg = IQLConfig(gamma=gamma, expectile=0.9, temperature=3.0, tau=0.05, reward_scale=0.5)
    agent, critic = _Agent(2), IQLCritic(2, LOW, HIGH, hidden_dim=32)
    _train(agent, critic, batch, cfg, steps=2500)
    v = agent.value(eye).squeeze(-1).detach()
    assert v[0] == pytest.approx(4.5, abs=0.3), v     # the data's mean would give 2.5
    assert v[1] == pytest.approx(0.2 / (1 - gamma), abs=0.15)
    assert v[0] > v[1] + 2.0
    steer = agent.dist(eye[:1]).mode()[0, 1].item()
    assert steer > 0.25, steer                     # behaviour cloning alone would sit at the mean, 0


def test_terminal_transitions_do_not_bootstrap():
    critic = IQLCritic(2, LOW, HIGH, hidden_dim=8)
    critic.init_bias(0.0)
    a = torch.tensor([[0.5, 0.0, 0.0]] * 2)
    f = torch.eye(2)
    cfg = IQLConfig(gamma=0.9)
    huge = torch.tensor([1e6, 1e6])
    done = iql_losses(torch.zeros(2), huge, f, torch.zeros(2), a, torch.ones(2), torch.ones(2, dtype=torch.bool), critic, cfg)
    live = iql_losses(torch.zeros(2), huge, f, torch.zeros(2), a, torch.ones(2), torch.zeros(2, dtype=torch.bool), critic, cfg)
    assert done["q_loss"].item() < 10.0 < live["q_loss"].item()
