"""SAC learns Pendulum-v1 with the same trainer that fine-tunes DrivingVLA.

Reference: rl-zoo's tuned SB3 SAC (lr 1e-3, batch 256, learning_starts ~1000, gamma 0.98, tau 0.02,
automatic entropy) reaches about -150 ... -200 within 2e4 steps; a random policy scores about -1200.
Here: the same settings with 64-unit networks instead of 256 (16x fewer flops per update, so the
test fits a few minutes of one shared CPU core) and a budget of 6000 steps (30 episodes).
"""
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

from stages.rl.configs import SACConfig
from stages.rl.sac import SACTrainer
from stages.rl.sac_networks import MLPActor
from tests.integration.helpers import pendulum_return

BUDGET_STEPS = 6000
LEARNED_RETURN = -400.0  # a random policy: ~ -1200; solved: ~ -150


@pytest.mark.slow
def test_sac_learns_pendulum_within_an_sb3_like_budget():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        env = gym.make("Pendulum-v1")
        config = SACConfig(learning_rate=1e-3, gamma=0.98, tau=0.02, batch_size=256, buffer_size=100_000,
                           learning_starts=1000, q_hidden_dim=64)
        trainer = SACTrainer(MLPActor.for_env(env, hidden_dim=64), env, config, seed=0)
        start = time.perf_counter()
        trainer.train(BUDGET_STEPS)
        seconds = time.perf_counter() - start
        returns = list(trainer.episode_returns)
        first, last = float(np.mean(returns[:5])), float(np.mean(returns[-5:]))

        evaluation = pendulum_return(lambda obs: trainer.model.act(obs, deterministic=True), range(100, 105))
        print(f"\npendulum SAC: {BUDGET_STEPS} steps in {seconds:.0f} s ({trainer.updates} updates); "
              f"first 5 episodes {first:.0f}, last 5 {last:.0f}, deterministic eval {evaluation:.0f}")
        assert first < -900, "the first episodes (random warm-up) should score like a random policy"
        assert last >= LEARNED_RETURN
        assert evaluation >= LEARNED_RETURN
    finally:
        torch.set_num_threads(threads)
