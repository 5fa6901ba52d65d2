"""DAgger's data path: the learner drives, every visited state carries the expert's action as its label."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.data.dagger import drive_labelled, extend_dataset, record_round, round_epochs
from stages.data.shards import ShardedDataset, read_shard
from stages.envs import EnvConfig, ExpertDriver, make_env

ENV = EnvConfig(scenario="highway", image_size=32, max_episode_steps=40)
DRIFT = np.array([0.4, 0.08, 0.0], dtype=np.float32)   # a learner that veers right


class LabellingExpert:
    """The scripted expert, remembering every action it was asked for and where the ego was."""

    def __init__(self) -> None:
        self.driver, self.asked = ExpertDriver(), []

    def __call__(self, env) -> np.ndarray:
        action = self.driver.act(env)
        self.asked.append((action.copy(), np.array(env.unwrapped.ego.position)))
        return action


def test_learner_drives_and_each_visited_state_is_labelled_with_the_expert_action():
    env = make_env(ENV)
    expert = LabellingExpert()
    ep = drive_labelled(env, lambda obs: DRIFT, expert, seed=3)
    env.close()
    n = len(ep)
    assert n >= 5 and ep.perturbed
    # Executed: the learner's action, on every step.
    np.testing.assert_array_equal(ep.actions, np.tile(DRIFT, (n, 1)))
    # Labelled: the expert's action at the state the learner reached, asked once per step.
    assert len(expert.asked) == n
    np.testing.assert_array_equal(ep.expert_actions, np.stack([a for a, _ in expert.asked]))
    # The learner drifts right of the lane: the expert's labels steer back left (recovery).
    assert ep.states[-1, 1] > 0.5
    assert ep.expert_actions[-1, 1] < 0.0


def test_expert_drives_when_asked():
    env = make_env(ENV)
    ep = drive_labelled(env, lambda obs: DRIFT, LabellingExpert(), seed=3, expert_drives=True)
    env.close()
    np.testing.assert_array_equal(ep.actions, ep.expert_actions)
    assert not ep.perturbed


class DriftModel(torch.nn.Module):
    """A stand-in policy with DrivingVLA's `act` and tokenizer."""

    def tokenize(self, texts):
        return torch.zeros(len(texts), 4, dtype=torch.long)

    def act(self, image, state, tokens, deterministic=False):
        return torch.as_tensor(DRIFT)[None], torch.zeros(1), torch.zeros(1)


def test_round_is_recorded_sharded_and_added_to_the_dataset(tmp_path):
    manifest = record_round(DriftModel(), ENV, tmp_path / "dagger", 0, episodes=2, seed=0, horizon=4, stride=1,
                            key="k", shard_size=16)
    root = tmp_path / "dagger" / "round-00"
    assert (root / "manifest.json").is_file() and len(manifest["episodes"]) == 2
    z = read_shard(root / manifest["shards"][0]["file"])
    assert z["perturbed"].all() and z["action_valid"].all()
    np.testing.assert_allclose(z["actions"], np.tile(DRIFT, (len(z["actions"]), 1)))
    assert not np.allclose(z["expert_actions"], z["actions"])

    class Dataset(ShardedDataset):
        def __init__(self):   # an empty train split
            self.root, self.shards, self.shuffle, self.seed = tmp_path, [], False, 0
            self.with_next, self.only_transitions, self.epoch = False, False, 0

    ds = Dataset()
    added = extend_dataset(ds, tmp_path / "dagger", manifest)
    assert added == sum(e["steps"] for e in manifest["episodes"]) == len(ds)
    labels = np.stack([s["expert_action"] for s in ds])
    assert labels.shape == (added, 3)
    # Reused on a resumed run (same key), re-recorded otherwise.
    again = record_round(DriftModel(), ENV, tmp_path / "dagger", 0, episodes=2, seed=0, horizon=4, stride=1,
                         key="k", shard_size=16, reuse=True)
    assert again["counts"]["record_seconds"] == manifest["counts"]["record_seconds"]


@pytest.mark.parametrize(("rounds", "start", "every", "epochs", "want"),
                         [(0, 4, 2, 10, []), (2, 4, 2, 10, [4, 6]), (3, 6, 3, 10, [6, 9]), (1, 10, 1, 10, [])])
def test_round_epochs(rounds, start, every, epochs, want):
    class O:
        dagger_rounds, dagger_start_epoch, dagger_every = rounds, start, every
    O.epochs = epochs
    assert round_epochs(O) == want
