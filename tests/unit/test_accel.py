"""Gradient accumulation and data parallelism give the gradient of one process on the whole batch.

Gradients are compared directly, not parameters after an AdamW step: Adam (and clipping by the
global norm) hides a gradient that is off by a constant factor, so a wrong averaging factor would
pass a comparison of parameters."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from models import DrivingVLA, DrivingVLAConfig
from stages.accel import Distributed, micro_batches
from stages.common import torch_threads
from stages.config import build_config
from stages.offline import accumulate_gradients, fp32_forward, iql_config
from stages.pretrain import contrastive_step, make_embed
from stages.rl.iql import IQLCritic
from stages.training import TokenCache

BATCH = 13          # odd: ranks and micro-batches of unequal sizes
WORLD = 2


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: more threads only spin-wait on a shared machine (10x slower, measured).
    with torch_threads(1):
        yield


def tiny_model() -> DrivingVLA:
    torch.manual_seed(0)
    return DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32, trajectory_length=5))


def tiny_critic(model: DrivingVLA) -> IQLCritic:
    torch.manual_seed(1)
    return IQLCritic(model.config.hidden_dim, model.action_low, model.action_high)


def global_batch() -> dict:
    """A batch whose masks are uneven: masked means over micro-batches and ranks of different counts."""
    g = torch.Generator().manual_seed(0)
    b = BATCH
    img = lambda: torch.randint(0, 256, (b, 32, 32, 3), dtype=torch.uint8, generator=g)  # noqa: E731
    captions = ["a car ahead", "a truck left", "a car ahead", "empty road", "a car ahead", "rain, a bus right",
                "empty road", "night, a car behind", "a truck left", "two cars ahead", "a bus", "a car ahead", "x"]
    commands = ["follow the lane", "turn left", "follow the lane"] * 5
    return {
        "image": img(), "next_image": img(),
        "state": torch.randn(b, 8, generator=g) * 3, "next_state": torch.randn(b, 8, generator=g) * 3,
        "action": torch.rand(b, 3, generator=g) * torch.tensor([1.0, 2.0, 1.0]) - torch.tensor([0.0, 1.0, 0.0]),
        "expert_action": torch.rand(b, 3, generator=g) * torch.tensor([1.0, 2.0, 1.0]) - torch.tensor([0.0, 1.0, 0.0]),
        "trajectory": torch.randn(b, 5, 2, generator=g),
        "reward": torch.rand(b, generator=g),
        "traj_valid": torch.tensor([0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool),
        "perturbed": torch.tensor([0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool),
        "action_valid": torch.tensor([0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool),
        "has_next": torch.tensor([0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool),
        "terminated": torch.tensor([0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool),
        "caption": captions, "command": commands[:b], "next_command": commands[1:b + 1],
    }


def offline_gradients(batch: dict, steps: int, dist: Distributed) -> dict[str, torch.Tensor]:
    model = tiny_model()
    critic = tiny_critic(model)
    o = build_config(preset="smoke").offline.model_copy(update={"grad_accum_steps": steps})
    scale = torch.full((5, 2), 0.7)
    params = list(model.parameters()) + list(critic.q.parameters())
    logged = accumulate_gradients(fp32_forward(model), model, critic, batch, TokenCache(model), "cpu", scale, o,
                                  iql_config(o), dist)
    assert logged and "q_loss" in logged[0]
    dist.average_gradients(params)
    named = {**{n: p for n, p in model.named_parameters()}, **{f"q.{n}": p for n, p in critic.q.named_parameters()}}
    # Parameters this loss does not reach (the contrastive projections) have no gradient alone, and
    # zeros after the ranks' average.
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in named.items()}


def pretrain_gradients(batch: dict, steps: int, dist: Distributed) -> dict[str, torch.Tensor]:
    model = tiny_model()
    loss = contrastive_step(model, make_embed(model, "cpu", False), batch, global_batch()["caption"],
                            TokenCache(model), "cpu", dist, steps)
    dist.average_gradients(model.encoder_parameters())     # what stage 1 trains
    return {"__loss": loss.reshape(1), **{n: p.grad.clone() for n, p in model.named_parameters()
                                         if n.startswith(model.ENCODER_MODULES)}}


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=name)
    # The comparison is not vacuous: the gradients are not all zero.
    assert sum(g.abs().sum().item() for g in want.values()) > 0


def test_micro_batches_cover_the_batch_in_order_and_never_empty():
    batch = {"x": torch.arange(7), "t": list("abcdefg")}
    parts = micro_batches(batch, 3)
    assert [p["x"].tolist() for p in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [p["t"] for p in parts] == [["a", "b", "c"], ["d", "e"], ["f", "g"]]
    assert [p["x"].tolist() for p in micro_batches({"x": torch.arange(2)}, 4)] == [[0], [1]]
    assert micro_batches(batch, 1) == [batch]


def test_micro_shares_weigh_masked_means_by_their_count():
    # Alone: each micro-batch's mean counts by its share of the batch's count; none counted: weight 0.
    assert Distributed().micro_shares([[1, 0], [3, 0]]) == [[0.25, 0.0], [0.75, 0.0]]


@pytest.mark.parametrize("steps", [2, 3])
def test_offline_accumulation_gives_the_full_batch_gradient(steps):
    want = offline_gradients(global_batch(), 1, Distributed())
    assert_same_gradients(offline_gradients(global_batch(), steps, Distributed()), want)


@pytest.mark.parametrize("steps", [2, 4])
def test_pretrain_accumulation_gives_the_full_batch_gradient(steps):
    """The gradient cache: in-batch negatives stay the whole batch's, identical captions stay positives."""
    want = pretrain_gradients(global_batch(), 1, Distributed())
    assert_same_gradients(pretrain_gradients(global_batch(), steps, Distributed()), want)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        dist = Distributed(rank=rank, local_rank=rank, world_size=WORLD)
        share = dist.split(global_batch())
        result = {}
        for steps in (1, 2):
            result[f"pretrain{steps}"] = pretrain_gradients(share, steps, dist)
            result[f"offline{steps}"] = offline_gradients(share, steps, dist)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_give_the_one_process_gradient(tmp_path):
    """Two gloo ranks, each on its share (and in micro-batches): after averaging, every rank holds the
    gradient of one process on the global batch. Pretrain's loss gathers the embeddings with their
    gradients; the gather's backward sums the ranks' gradients, the averaging divides by the world."""
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    want = {"pretrain": pretrain_gradients(global_batch(), 1, Distributed()),
            "offline": offline_gradients(global_batch(), 1, Distributed())}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for steps in (1, 2):
            assert_same_gradients(got[f"pretrain{steps}"], want["pretrain"])
            assert_same_gradients(got[f"offline{steps}"], want["offline"])
    assert np.isfinite(want["pretrain"]["__loss"].item())
