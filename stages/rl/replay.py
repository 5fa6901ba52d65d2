"""Replay storage for SAC: online transitions in a ring, an optional offline partition, mixed batches.

Memory. An observation is stored once, not twice: a transition at row ``r`` finds its next
observation at row ``next_row[r]``. Online, each env owns a column of a ring (``row = slot *
num_envs + env``) and its next observation is the following slot of the same column; when an
episode ends, the final observation takes one extra slot, which is never sampled as a transition
start, and the reset observation starts the slot after it. Images stay uint8; a command is stored
as an index into a table of the distinct token rows (a few dozen commands, not one 192-id row per
step). A 64x64 camera costs ~12 KB per transition; `buffer_size` x that is what the ring holds.

Fields. What an observation is made of is a field spec ``{name: (shape, dtype)}``: ``state``,
``image`` and ``tokens`` for the raw driving observation (the constructor's arguments), or any
other arrays (`ReplayBuffer.for_fields`), e.g. the frozen encoders' outputs that `SACTrainer`
stores instead of images. *Shared* fields (``tokens``, ``text_features``) repeat across many rows
and are stored once per distinct row, each row keeping an index into their table.

Bootstrapping. ``terminated`` cuts the bootstrap; a time-limit truncation does not: its transition
keeps the real final observation (from ``info["final_obs"]``, same-step autoreset) and the target
bootstraps from it, as it should.

Offline to online. ``add_offline_samples`` loads a recorded dataset (`stages.data.dataset.Samples`)
into a fixed partition (next observations are the following rows of the same episode) and
``sample`` draws ``round(batch_size * offline_ratio)`` of every batch from it, the rest online.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["ReplayBatch", "ReplayBuffer", "SHARED_FIELDS"]

FieldSpec = Mapping[str, tuple[tuple[int, ...], Any]]
# Fields whose rows repeat across many observations (one per command): stored as table indices.
SHARED_FIELDS = ("tokens", "text_features")
# Per-row array names of the raw fields in state dicts and on `_Storage` (``states``, ``images``).
_PLURAL = {"state": "states", "image": "images"}


@dataclass
class ReplayBatch:
    """``obs`` / ``next_obs`` hold the buffer's fields: ``state`` and, for driving, ``image`` (uint8)
    and ``tokens`` (int64), or whatever `ReplayBuffer.for_fields` was given."""

    obs: dict[str, torch.Tensor]
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: dict[str, torch.Tensor]
    terminated: torch.Tensor  # float 0/1: 1 cuts the bootstrap
    offline: torch.Tensor  # bool: the row came from the offline partition


class _Storage:
    """Observation rows plus the transition that starts at each row (if ``valid``)."""

    def __init__(self, rows: int, fields: dict[str, tuple[tuple[int, ...], np.dtype]], shared: tuple[str, ...],
                 action_dim: int):
        self.rows = rows
        self.obs = {name: np.zeros((rows, *shape), dtype=dtype) for name, (shape, dtype) in fields.items()
                    if name not in shared}
        self.ids = {name: np.zeros(rows, dtype=np.int32) for name in fields if name in shared}
        self.actions = np.zeros((rows, action_dim), dtype=np.float32)
        self.rewards = np.zeros(rows, dtype=np.float32)
        self.terminated = np.zeros(rows, dtype=bool)
        self.valid = np.zeros(rows, dtype=bool)
        self.next_row = np.zeros(rows, dtype=np.int64)

    # The raw driving fields by their historical names.
    @property
    def states(self) -> np.ndarray | None:
        return self.obs.get("state")

    @property
    def images(self) -> np.ndarray | None:
        return self.obs.get("image")

    def write_obs(self, rows: np.ndarray, obs: Mapping[str, np.ndarray], ids: Mapping[str, np.ndarray]) -> None:
        for name, array in self.obs.items():
            array[rows] = obs[name]
        for name, array in self.ids.items():
            array[rows] = ids[name]

    def arrays(self, rows: int | None = None) -> dict[str, np.ndarray]:
        """Every array by name (``obs.<field>``, ``ids.<field>``, the transition's), the first ``rows``."""
        out = {k: getattr(self, k) for k in ("actions", "rewards", "terminated", "valid", "next_row")}
        out.update({f"obs.{k}": v for k, v in self.obs.items()})
        out.update({f"ids.{k}": v for k, v in self.ids.items()})
        return {k: v[:rows] for k, v in out.items()}

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        for key, value in arrays.items():
            kind, _, name = key.partition(".")
            target = self.obs[name] if kind == "obs" else self.ids[name] if kind == "ids" else getattr(self, key)
            target[:len(value)] = value

    @property
    def row_bytes(self) -> int:
        return sum(a[:1].nbytes for a in self.arrays().values())


class ReplayBuffer:
    """SAC's replay buffer (see the module docstring).

    Observations passed to :meth:`add` are dicts of arrays with a leading ``num_envs`` axis:
    ``state`` always, ``image`` (uint8) when ``image_shape`` is given, ``tokens`` (int64 ids, any
    length up to ``token_length``; shorter rows are zero-padded) when ``token_length`` is given.
    `for_fields` builds a buffer of any other fields.
    """

    def __init__(self, capacity: int, state_shape: tuple[int, ...] | int, action_dim: int, num_envs: int = 1,
                 image_shape: tuple[int, ...] | None = None, token_length: int | None = None,
                 offline_ratio: float = 0.0, state_dtype: Any = np.float32):
        fields: dict[str, tuple[tuple[int, ...], Any]] = {
            "state": ((state_shape,) if isinstance(state_shape, int) else tuple(state_shape), state_dtype)}
        if image_shape is not None:
            fields["image"] = (tuple(image_shape), np.uint8)
        if token_length is not None:
            fields["tokens"] = ((token_length,), np.int64)
        self._setup(capacity, fields, action_dim, num_envs, offline_ratio)

    @classmethod
    def for_fields(cls, capacity: int, fields: FieldSpec, action_dim: int, num_envs: int = 1,
                   offline_ratio: float = 0.0) -> "ReplayBuffer":
        """A buffer of the observation fields ``{name: (shape, dtype)}`` (e.g. an `ObsAdapter`'s
        ``fields()``); the names in `SHARED_FIELDS` are deduplicated."""
        buffer = cls.__new__(cls)
        buffer._setup(capacity, fields, action_dim, num_envs, offline_ratio)
        return buffer

    def _setup(self, capacity: int, fields: FieldSpec, action_dim: int, num_envs: int, offline_ratio: float) -> None:
        if capacity < 1 or num_envs < 1:
            raise ValueError(f"capacity ({capacity}) and num_envs ({num_envs}) must be >= 1")
        if not 0.0 <= offline_ratio <= 1.0:
            raise ValueError(f"offline_ratio must lie in [0, 1], got {offline_ratio}")
        if not fields:
            raise ValueError("a replay buffer needs at least one observation field")
        self.fields = {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in fields.items()}
        self.shared = tuple(name for name in self.fields if name in SHARED_FIELDS)
        self.state_shape = self.fields["state"][0] if "state" in self.fields else None
        self.image_shape = self.fields["image"][0] if "image" in self.fields else None
        self.token_length = self.fields["tokens"][0][0] if "tokens" in self.fields else None
        self.action_dim = action_dim
        self.num_envs = num_envs
        self.offline_ratio = offline_ratio
        # One spare slot per column: the pending next observation of the newest transition.
        self.slots = math.ceil(capacity / num_envs) + 1
        self.capacity = capacity
        self._online = self._storage(self.slots * num_envs)
        self._offline: _Storage | None = None
        self._offline_starts = np.zeros(0, dtype=np.int64)
        self._slot = np.zeros(num_envs, dtype=np.int64)  # next slot each env writes
        self._touched = 0  # slots in use (sampling draws below it)
        self._tables = {name: np.zeros((0, *self.fields[name][0]), dtype=self.fields[name][1]) for name in self.shared}
        self._table_index: dict[str, dict[bytes, int]] = {name: {} for name in self.shared}

    def _storage(self, rows: int) -> _Storage:
        return _Storage(rows, self.fields, self.shared, self.action_dim)

    @property
    def _text_table(self) -> np.ndarray:
        """The distinct token rows (commands)."""
        return self._tables.get("tokens", np.zeros((0, 0), dtype=np.int64))

    # -- shared rows ----------------------------------------------------------------------------
    def _shared_ids(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {name: self._ids_of(name, obs.get(name)) for name in self.shared}

    def _ids_of(self, name: str, values: Any) -> np.ndarray:
        shape, dtype = self.fields[name]
        if values is None:
            what = "obs['tokens'] (token ids)" if name == "tokens" else f"obs[{name!r}]"
            raise ValueError(f"this buffer stores {name}: pass {what}")
        values = np.asarray(values, dtype=dtype)
        if name == "tokens":  # token rows of any length up to token_length, zero-padded
            length = shape[0]
            if values.shape[-1] > length:
                if np.any(values[:, length:]):
                    raise ValueError(f"token rows of length {values.shape[-1]} exceed token_length={length}")
                values = values[:, :length]
            if values.shape[-1] < length:
                values = np.pad(values, ((0, 0), (0, length - values.shape[-1])))
        elif values.shape[1:] != shape:
            raise ValueError(f"{name} rows have shape {values.shape[1:]}, this buffer stores {shape}")
        index, ids, new_rows = self._table_index[name], np.empty(len(values), dtype=np.int32), []
        for i, row in enumerate(values):
            key = row.tobytes()
            idx = index.get(key)
            if idx is None:
                idx = index[key] = len(index)
                new_rows.append(row)
            ids[i] = idx
        if new_rows:
            self._tables[name] = np.concatenate([self._tables[name], np.stack(new_rows)])
        return ids

    # -- online -------------------------------------------------------------------------------
    def add(self, obs: dict[str, np.ndarray], actions: np.ndarray, rewards: np.ndarray,
            next_obs: dict[str, np.ndarray], terminated: np.ndarray, done: np.ndarray,
            envs: np.ndarray | None = None) -> None:
        """One vector step. ``next_obs`` must already hold the final observation for envs whose
        episode ended (``done`` = terminated or truncated); only ``terminated`` cuts the bootstrap.
        ``envs``: the rows are the steps of these envs only (envs stepping each at its own pace)."""
        n, s = self.num_envs, self._online
        envs = np.arange(n) if envs is None else np.asarray(envs, dtype=np.int64)
        slot = self._slot[envs]
        rows = slot * n + envs
        next_rows = ((slot + 1) % self.slots) * n + envs
        s.write_obs(rows, obs, self._shared_ids(obs))
        s.write_obs(next_rows, next_obs, self._shared_ids(next_obs))
        s.valid[next_rows] = False  # holds an observation, no transition yet
        s.actions[rows] = actions
        s.rewards[rows] = rewards
        s.terminated[rows] = terminated
        s.next_row[rows] = next_rows
        s.valid[rows] = True
        done = np.asarray(done, dtype=bool)
        self._touched = min(self.slots, max(self._touched, int(slot.max()) + 2))
        # After an episode end the final observation keeps its slot; the reset one starts the next.
        self._slot[envs] = (slot + 1 + done) % self.slots

    # -- offline ------------------------------------------------------------------------------
    def add_offline_samples(self, samples: Any, tokenize: Callable[[list[str]], Any] | None = None,
                            terminated: np.ndarray | None = None,
                            encode: Callable[[dict[str, Any]], dict[str, np.ndarray]] | None = None,
                            chunk_size: int = 256) -> int:
        """Load recorded episodes as the offline partition, replacing any earlier one; returns the
        number of usable transitions.

        ``samples`` is the built dataset's `SplitArrays` (`stages.data.shards.load_split_arrays`:
        ``next_index``, ``terminated``, ``action_valid``) or the episodes' `Samples`
        (`stages.data.dataset.load_split`: consecutive rows of each ``episode``, ``dones``).
        A transition needs a next observation unless it terminated (no bootstrap, so the next
        observation is never used): an episode's truncated last step is dropped, its terminated
        last step kept. Without ``terminated`` (argument or field) every last step is dropped.

        ``encode`` turns a chunk of raw observations (``{"image", "state", "command"}``, as a
        vector env returns them) into this buffer's fields, for a buffer that stores something
        else than raw observations (e.g. encoder outputs); ``tokenize`` is then not used.
        """
        states = np.asarray(samples.states)
        n = len(states)
        if n == 0:
            raise ValueError("offline samples are empty: record some episodes with the data stage first")
        images = getattr(samples, "images", None)
        if encode is None:
            if self.state_shape is None or states.shape[1:] != self.state_shape:
                raise ValueError(f"offline states have shape {states.shape[1:]} but the env's are {self.state_shape}")
            if self.image_shape is not None:
                images = np.asarray(images)
                if images.shape[1:] != self.image_shape:
                    raise ValueError(f"offline images are {images.shape[1:]} but the env renders {self.image_shape}: "
                                     "record the data with the same env.image_size (rerun the data stage)")
        actions = np.asarray(samples.actions, dtype=np.float32).reshape(n, -1)
        if actions.shape[1] != self.action_dim:
            raise ValueError(f"offline actions have {actions.shape[1]} dimensions, the env has {self.action_dim}")

        if terminated is None:
            terminated = getattr(samples, "terminated", None)
        if terminated is None:
            log.warning("offline samples carry no 'terminated' flags: dropping the last step of every episode")
            term = np.zeros(n, dtype=bool)
        else:
            term = np.asarray(terminated, dtype=bool)
        rows = np.arange(n)
        next_index = getattr(samples, "next_index", None)
        if next_index is not None:
            next_index = np.asarray(next_index, dtype=np.int64)
            has_next = next_index >= 0
            next_row = np.where(has_next, next_index, rows)
        else:
            episode, dones = np.asarray(samples.episode), np.asarray(samples.dones, dtype=bool)
            has_next = np.zeros(n, dtype=bool)
            has_next[:-1] = (episode[1:] == episode[:-1]) & ~dones[:-1]
            next_row = np.where(has_next, rows + 1, rows)
        valid = has_next | term
        action_valid = getattr(samples, "action_valid", None)
        if action_valid is not None:  # e.g. nuScenes keyframes: no controls were recorded
            valid &= np.asarray(action_valid, dtype=bool)

        s = self._storage(n)
        if encode is None:
            obs: dict[str, Any] = {"state": states}
            if self.image_shape is not None:
                obs["image"] = images
            if self.token_length is not None:
                if tokenize is None:
                    raise ValueError("this buffer stores commands: pass tokenize (e.g. model.tokenize)")
                commands = [str(c) for c in samples.commands]
                distinct = list(dict.fromkeys(commands))
                table = np.asarray(torch.as_tensor(tokenize(distinct)).cpu(), dtype=np.int64)
                rows_of = dict(zip(distinct, self._ids_of("tokens", table)))
                s.ids["tokens"][:] = [rows_of[c] for c in commands]
            s.write_obs(rows, obs, {name: s.ids[name] for name in self.shared})
        else:
            commands = getattr(samples, "commands", None)
            for lo in range(0, n, chunk_size):
                part = slice(lo, min(lo + chunk_size, n))
                raw: dict[str, Any] = {"state": states[part]}
                if images is not None:
                    raw["image"] = np.asarray(images[part])
                if commands is not None:
                    raw["command"] = [str(c) for c in commands[part]]
                encoded = encode(raw)
                s.write_obs(rows[part], encoded, self._shared_ids(encoded))
        s.actions[:] = actions
        s.rewards[:] = np.asarray(samples.rewards, dtype=np.float32)
        s.terminated[:] = term
        s.valid[:] = valid
        s.next_row[:] = next_row
        self._offline = s
        self._offline_starts = np.flatnonzero(valid)
        log.info("replay: %d offline transitions of %d samples", len(self._offline_starts), n)
        return len(self._offline_starts)

    @classmethod
    def from_samples(cls, samples: Any, capacity: int, tokenize: Callable[[list[str]], Any] | None = None,
                     num_envs: int = 1, offline_ratio: float = 0.5, token_length: int | None = None,
                     terminated: np.ndarray | None = None) -> "ReplayBuffer":
        """A buffer shaped like ``samples`` (images, states, commands) and seeded with them."""
        images = getattr(samples, "images", None)
        has_text = tokenize is not None
        if has_text and token_length is None:
            token_length = int(torch.as_tensor(tokenize(["x"])).shape[-1])
        buffer = cls(capacity, np.asarray(samples.states).shape[1:], np.asarray(samples.actions).shape[-1],
                     num_envs=num_envs, image_shape=None if images is None else np.asarray(images).shape[1:],
                     token_length=token_length if has_text else None, offline_ratio=offline_ratio)
        buffer.add_offline_samples(samples, tokenize, terminated)
        return buffer

    # -- sizes and sampling -------------------------------------------------------------------
    @property
    def online_size(self) -> int:
        """Online transitions that can be sampled."""
        return int(self._online.valid[: self._touched * self.num_envs].sum())

    @property
    def offline_size(self) -> int:
        return len(self._offline_starts)

    @property
    def online_nbytes(self) -> int:
        """Bytes of the online rows in use: what `state_dict` copies."""
        return self._touched * self.num_envs * self._online.row_bytes + sum(t.nbytes for t in self._tables.values())

    def __len__(self) -> int:
        return self.online_size + self.offline_size

    def _online_rows(self, k: int, rng: np.random.Generator) -> np.ndarray:
        # Rejection sampling: invalid rows (a pending next observation per env, one final
        # observation per episode) are a small share of the touched ones.
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        valid, n = self._online.valid, self.num_envs
        parts, need = [], k
        for _ in range(32):
            cand = rng.integers(0, self._touched, size=2 * need + 8) * n + rng.integers(0, n, size=2 * need + 8)
            cand = cand[valid[cand]][:need]
            parts.append(cand)
            need -= len(cand)
            if need == 0:
                return np.concatenate(parts)
        # Almost only invalid rows (a buffer holding a handful of transitions): draw exactly.
        return np.concatenate([*parts, rng.choice(np.flatnonzero(valid), size=need)])

    def sample(self, batch_size: int, rng: np.random.Generator, device: str | torch.device = "cpu") -> ReplayBatch:
        """``round(batch_size * offline_ratio)`` offline rows and the rest online, both uniform;
        all from one partition when the other is empty."""
        on, off = self.online_size, self.offline_size
        if on == 0 and off == 0:
            raise ValueError("the replay buffer is empty: add transitions before sampling")
        n_off = int(round(batch_size * self.offline_ratio)) if on and off else (batch_size if off else 0)
        parts = [(self._online, self._online_rows(batch_size - n_off, rng), False)]
        if n_off:
            parts.append((self._offline, self._offline_starts[rng.integers(0, off, size=n_off)], True))
        arrays: dict[str, list[np.ndarray]] = {}
        for storage, rows, is_offline in parts:
            nxt = storage.next_row[rows]
            for name, value in (("actions", storage.actions[rows]), ("rewards", storage.rewards[rows]),
                                ("terminated", storage.terminated[rows].astype(np.float32)),
                                ("offline", np.full(len(rows), is_offline))):
                arrays.setdefault(name, []).append(value)
            for prefix, r in (("obs.", rows), ("next.", nxt)):
                for name, array in storage.obs.items():
                    arrays.setdefault(prefix + name, []).append(array[r])
                for name, ids in storage.ids.items():
                    arrays.setdefault(prefix + name, []).append(self._tables[name][ids[r]])
        t = {k: torch.from_numpy(np.concatenate(v)).to(device) for k, v in arrays.items()}
        return ReplayBatch(obs={k[4:]: v for k, v in t.items() if k.startswith("obs.")},
                           actions=t["actions"], rewards=t["rewards"],
                           next_obs={k[5:]: v for k, v in t.items() if k.startswith("next.")},
                           terminated=t["terminated"], offline=t["offline"])

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self, include_offline: bool = False) -> dict[str, Any]:
        """Everything needed to continue: the online rows in use (not the empty rest of the ring)
        and the shared tables; the offline partition is left out by default (it is reloaded from
        the dataset)."""
        rows = self._touched * self.num_envs
        state: dict[str, Any] = {"fields": {k: (shape, str(dtype)) for k, (shape, dtype) in self.fields.items()},
                                 "rows": self._online.rows, "slot": self._slot.copy(), "touched": self._touched,
                                 "tables": {k: v.copy() for k, v in self._tables.items()},
                                 "online": {k: v.copy() for k, v in self._online.arrays(rows).items()}}
        if include_offline and self._offline is not None:
            state["offline"] = {k: v.copy() for k, v in self._offline.arrays().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {k: (shape, str(dtype)) for k, (shape, dtype) in self.fields.items()}
        saved = {k: (tuple(shape), dtype) for k, (shape, dtype) in state["fields"].items()}
        if saved != mine or int(state["rows"]) != self._online.rows or len(state["slot"]) != self.num_envs:
            raise ValueError(f"saved buffer holds {state['rows']} rows of {saved} for {len(state['slot'])} envs, "
                             f"this one {self._online.rows} of {mine} for {self.num_envs}: "
                             "same buffer_size, num_envs and env needed")
        self._online = self._storage(self._online.rows)
        self._online.load_arrays(state["online"])
        self._slot = np.asarray(state["slot"]).copy()
        self._touched = int(state["touched"])
        self._tables = {k: np.asarray(v).copy() for k, v in state["tables"].items()}
        self._table_index = {k: {row.tobytes(): i for i, row in enumerate(v)} for k, v in self._tables.items()}
        if "offline" in state:
            off = state["offline"]
            self._offline = self._storage(len(off["valid"]))
            self._offline.load_arrays(off)
            self._offline_starts = np.flatnonzero(self._offline.valid)
