"""The built training dataset: compressed shards, a manifest, and a `DataLoader` over them.

Layout of a built dataset folder::

    manifest.json                      format, trajectory grid, ego box sizes, counts per split and source
    shards/<split>-<source>-NNNNN.npz  compressed arrays of whole episodes (or nuScenes scenes)

A shard holds whole episodes, so a transition's next state (``next_index``, -1 when there is none)
is always in the same shard: offline RL reads ``(s, a, r, s')`` without touching a second file.
Arrays of a shard (n samples, M agent rows):

    images uint8 [n, H, W, 3] (or [n, C, H, W, 3])   states float32 [n, 8]
    actions float32 [n, 3] executed                  expert_actions float32 [n, 3] BC labels
    action_valid bool [n] (False: no controls known, e.g. nuScenes keyframes)
    rewards float32 [n]   terminated bool [n]        next_index int32 [n]
    trajectories float32 [n, T, 2] on the manifest's time grid, ego frame; traj_valid bool [n]
    commands str [n]      captions str [n]           perturbed bool [n]     episode int32 [n]
    agent_boxes float32 [M, 6] (t seconds, x, y, yaw, length, width) future boxes in the ego frame
    agent_offsets int64 [n + 1]

`ShardedDataset` streams shards (shard order and sample order within a shard shuffled per epoch,
deterministically from the seed and the epoch, so a resumed run sees the same order); DataLoader
workers split the shards between them. `make_loader` cuts the stream into global batches and, under
``torchrun``, builds only this rank's share of each (`RankBatches`). `load_split_arrays` reads a whole
split into memory (evaluation).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stages.accel import share_bounds
from stages.common import write_json
from stages.data.dataset import DatasetError

log = logging.getLogger(__name__)

FORMAT = "drivevla-shards-v1"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
SAMPLE_KEYS = ("images", "states", "actions", "expert_actions", "action_valid", "rewards", "terminated",
               "next_index", "trajectories", "traj_valid", "commands", "captions", "perturbed", "episode")
AGENT_KEYS = ("agent_boxes", "agent_offsets")


class ShardWriter:
    """Collects episodes of one split and source and writes a shard each time ``shard_size`` is reached."""

    def __init__(self, out: Path, split: str, source: str, shard_size: int):
        self.out, self.split, self.source, self.shard_size = Path(out), split, source, shard_size
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_n = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, episode: dict[str, np.ndarray]) -> None:
        """Add one episode's sample arrays (``next_index`` relative to the episode's first sample)."""
        n = len(episode["states"])
        missing = [k for k in (*SAMPLE_KEYS, *AGENT_KEYS) if k not in episode]
        if missing:
            raise ValueError(f"episode arrays lack {missing}")
        if n == 0:
            return
        self.pending.append(episode)
        self.pending_n += n
        if self.pending_n >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        merged: dict[str, np.ndarray] = {}
        base, rows = 0, 0
        nexts, offsets = [], [np.zeros(1, np.int64)]
        for ep in self.pending:
            n = len(ep["states"])
            nexts.append(np.where(ep["next_index"] >= 0, ep["next_index"] + base, -1).astype(np.int32))
            offsets.append(ep["agent_offsets"][1:].astype(np.int64) + rows)
            base += n
            rows += int(ep["agent_offsets"][-1])
        for key in SAMPLE_KEYS:
            merged[key] = np.concatenate([ep[key] for ep in self.pending])
        merged["next_index"] = np.concatenate(nexts)
        merged["agent_boxes"] = np.concatenate([ep["agent_boxes"] for ep in self.pending]).astype(np.float32)
        merged["agent_offsets"] = np.concatenate(offsets)
        name = f"{self.split}-{self.source}-{len(self.shards):05d}.npz"
        path = self.out / SHARD_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **merged)
        self.shards.append({"file": f"{SHARD_DIR}/{name}", "split": self.split, "source": self.source,
                            "samples": base, "episodes": len(self.pending),
                            "transitions": int(transition_mask(merged).sum())})
        self.pending, self.pending_n = [], 0


def transition_mask(z: dict[str, np.ndarray]) -> np.ndarray:
    """Samples usable as RL transitions: known controls and either a next state or a terminal step."""
    return z["action_valid"] & ((z["next_index"] >= 0) | z["terminated"])


def write_manifest(out: Path, shards: Sequence[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json``: ``info`` plus the shard list and the counts per split and source."""
    counts: dict[str, dict[str, Any]] = {}
    for sh in shards:
        split = counts.setdefault(sh["split"], {"samples": 0, "episodes": 0, "shards": 0, "by_source": {}})
        split["samples"] += sh["samples"]
        split["episodes"] += sh["episodes"]
        split["shards"] += 1
        src = split["by_source"].setdefault(sh["source"], {"samples": 0, "episodes": 0})
        src["samples"] += sh["samples"]
        src["episodes"] += sh["episodes"]
    manifest = {"format": FORMAT, **info, "shards": list(shards), "counts": counts}
    write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise DatasetError(f"{path} not found: build the training dataset first (`python -m stages.data`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}); rerun the data stage") from exc
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; rerun the data stage")
    return manifest


def split_shards(manifest: dict[str, Any], split: str, sources: Sequence[str] | None = None) -> list[dict[str, Any]]:
    shards = [s for s in manifest["shards"] if s["split"] == split and (sources is None or s["source"] in sources)]
    if not shards:
        have = sorted({(s["split"], s["source"]) for s in manifest["shards"]})
        raise DatasetError(f"the built dataset has no {split!r} shards"
                           f"{f' from sources {list(sources)}' if sources else ''} (it has {have})")
    return shards


def read_shard(path: str | Path, keys: set[str] | None = None) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if keys is None or k in keys}
    except Exception as exc:  # BadZipFile, ValueError, EOFError, FileNotFoundError ...
        raise DatasetError(f"shard {path} cannot be read ({type(exc).__name__}: {exc}); rerun the data stage") from exc


@dataclass
class SplitArrays:
    """A whole split in memory (every shard concatenated; ``next_index`` global)."""

    arrays: dict[str, np.ndarray]
    source: np.ndarray    # str [n]

    def __len__(self) -> int:
        return len(self.arrays["states"])

    def __getattr__(self, key: str) -> np.ndarray:
        try:
            return self.__dict__["arrays"][key]
        except KeyError:
            raise AttributeError(key) from None

    def agents(self, i: int) -> np.ndarray:
        off = self.arrays["agent_offsets"]
        return self.arrays["agent_boxes"][off[i]:off[i + 1]]

    def select(self, mask: np.ndarray) -> SplitArrays:
        """The samples where ``mask`` holds (``next_index`` no longer meaningful: set to -1)."""
        idx = np.flatnonzero(mask)
        out = {k: v[idx] for k, v in self.arrays.items() if k not in AGENT_KEYS}
        out["next_index"] = np.full(len(idx), -1, np.int32)
        off = self.arrays["agent_offsets"]
        boxes = [self.arrays["agent_boxes"][off[i]:off[i + 1]] for i in idx]
        out["agent_boxes"] = np.concatenate(boxes) if boxes else np.zeros((0, 6), np.float32)
        out["agent_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in boxes])]).astype(np.int64)
        return SplitArrays(out, self.source[idx])


def load_split_arrays(root: str | Path, split: str, sources: Sequence[str] | None = None,
                      keys: Sequence[str] | None = None) -> SplitArrays:
    """A whole split in memory; ``keys`` limits the arrays read (e.g. everything but the images)."""
    root = Path(root)
    shards = split_shards(read_manifest(root), split, sources)
    wanted = None if keys is None else {*keys, "states", "next_index", *AGENT_KEYS}
    parts: dict[str, list[np.ndarray]] = {}
    source: list[np.ndarray] = []
    base = rows = 0
    for sh in shards:
        z = read_shard(root / sh["file"], wanted)
        n = len(z["states"])
        z["next_index"] = np.where(z["next_index"] >= 0, z["next_index"] + base, -1).astype(np.int32)
        z["agent_offsets"] = (z["agent_offsets"][1:] if parts else z["agent_offsets"]) + rows
        for k, v in z.items():
            parts.setdefault(k, []).append(v)
        source.append(np.full(n, sh["source"]))
        base += n
        rows += int(z["agent_boxes"].shape[0])
    return SplitArrays({k: np.concatenate(v) for k, v in parts.items()}, np.concatenate(source))


def _sample(z: dict[str, np.ndarray], i: int, with_next: bool) -> dict[str, Any]:
    out = {
        "image": torch.from_numpy(z["images"][i]), "state": torch.from_numpy(z["states"][i]),
        "action": torch.from_numpy(z["actions"][i]), "expert_action": torch.from_numpy(z["expert_actions"][i]),
        "action_valid": bool(z["action_valid"][i]), "reward": float(z["rewards"][i]),
        "terminated": bool(z["terminated"][i]), "trajectory": torch.from_numpy(z["trajectories"][i]),
        "traj_valid": bool(z["traj_valid"][i]), "perturbed": bool(z["perturbed"][i]),
        "command": str(z["commands"][i]), "caption": str(z["captions"][i]),
    }
    if with_next:
        j = int(z["next_index"][i])
        out["has_next"] = j >= 0
        j = j if j >= 0 else i      # a placeholder, masked out by has_next
        out["next_image"] = torch.from_numpy(z["images"][j])
        out["next_state"] = torch.from_numpy(z["states"][j])
        out["next_command"] = str(z["commands"][j])
    return out


def _empty_batch(z: dict[str, np.ndarray], with_next: bool) -> dict[str, Any]:
    """A collated batch of no samples: `_sample`'s keys, in its order, with `collate`'s types and the
    shard's shapes (a rank's share of a global batch smaller than the world)."""
    flag, number = torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.get_default_dtype())
    out: dict[str, Any] = {
        "image": torch.from_numpy(z["images"][:0]), "state": torch.from_numpy(z["states"][:0]),
        "action": torch.from_numpy(z["actions"][:0]), "expert_action": torch.from_numpy(z["expert_actions"][:0]),
        "action_valid": flag, "reward": number, "terminated": flag.clone(),
        "trajectory": torch.from_numpy(z["trajectories"][:0]), "traj_valid": flag.clone(),
        "perturbed": flag.clone(), "command": [], "caption": [],
    }
    if with_next:
        out.update({"has_next": flag.clone(), "next_image": torch.from_numpy(z["images"][:0]),
                    "next_state": torch.from_numpy(z["states"][:0]), "next_command": []})
    return out


class ShardedDataset(IterableDataset):
    """Samples of one split streamed shard by shard; see the module docstring.

    ``with_next`` adds ``next_image`` / ``next_state`` / ``next_command`` / ``has_next`` (offline RL);
    ``only_transitions`` keeps the samples `transition_mask` accepts.
    """

    def __init__(self, root: str | Path, split: str, *, shuffle: bool = True, seed: int = 0,
                 sources: Sequence[str] | None = None, with_next: bool = False, only_transitions: bool = False):
        self.root = Path(root)
        self.shards = split_shards(read_manifest(self.root), split, sources)
        self.shuffle, self.seed, self.with_next, self.only_transitions = shuffle, seed, with_next, only_transitions
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The shuffle order is a function of (seed, epoch): call before each epoch's iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self._shard_sizes())

    def _shard_sizes(self) -> list[int]:
        key = "transitions" if self.only_transitions else "samples"
        return [s[key] for s in self.shards]

    def shard_order(self) -> np.ndarray:
        """This epoch's order of the shards (indices into ``shards``)."""
        if not self.shuffle:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def worker_sizes(self, num_workers: int) -> list[int]:
        """Samples each of ``num_workers`` DataLoader workers streams this epoch (one stream when 0):
        worker w takes every ``num_workers``-th shard of `shard_order`, from the w-th."""
        sizes = np.asarray(self._shard_sizes())[self.shard_order()]
        return [int(sizes[w::max(num_workers, 1)].sum()) for w in range(max(num_workers, 1))]

    def positions(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """``(shard arrays, sample index)`` of each sample of this process's stream (this DataLoader
        worker's shards), in the order `__iter__` yields them, without building the samples."""
        order = self.shard_order()
        worker = get_worker_info()
        if worker is not None:
            order = order[worker.id::worker.num_workers]
        for k in order:
            z = read_shard(self.root / self.shards[k]["file"])
            idx = np.arange(len(z["states"]))
            if self.only_transitions:
                idx = idx[transition_mask(z)]
            if self.shuffle:
                idx = np.random.default_rng([self.seed, self.epoch, int(k)]).permutation(idx)
            for i in idx:
                yield z, int(i)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for z, i in self.positions():
            yield _sample(z, i, self.with_next)


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and scalars; keep text as lists (the model's tokenizer turns them into ids)."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (bool, float, int)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


class RankBatch(NamedTuple):
    """One global batch as one rank of a data-parallel job sees it."""

    share: dict[str, Any]           # this rank's contiguous share, collated (tensors of length 0 when it has none)
    size: int                       # samples in the whole global batch (the same on every rank)
    captions: list[str] | None      # the whole global batch's captions, where asked for (contrastive positives)


class RankBatches(IterableDataset):
    """The global batches of ``dataset``, of which this rank builds and collates only its own share.

    Global batches are cut from the sample stream as ``DataLoader(dataset, batch_size)`` cuts them:
    ``batch_size`` consecutive samples, the last one of a stream partial; with DataLoader workers each
    worker cuts its own stream (its shards), and the DataLoader hands out one item per worker in turn,
    skipping a worker once it is exhausted. That order is deterministic (it depends only on how many
    items each worker yields), so every rank, with the same seed and workers, sees the same sequence of
    global batches as a one-process run. Of each, rank r gets ``[lo, hi)`` by `share_bounds` (the
    rule of `Distributed.split`); samples outside it are skipped by index before `_sample` builds
    their tensors. A rank whose share is empty (a global batch smaller than the world) still yields
    an item, an empty batch: every worker of every rank then yields as many items, which keeps the
    interleaving, and so the global batches, the same on every rank, and every rank takes each step.

    Each rank still reads and decompresses every shard of its stream. That is fine: a shard holds
    whole episodes (a next state is always in the same shard) and many global batches, and every
    global batch of at least ``world_size`` samples gives every rank some, so each rank needs nearly
    every shard anyway. ``captions`` adds the whole global batch's captions, read by index (strings,
    no tensors). With ``world_size`` 1 the shares are the global batches, as the DataLoader cut them.
    """

    def __init__(self, dataset: ShardedDataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, captions: bool = False):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size=} {rank=} "
                             f"{world_size=}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.num_workers, self.captions = num_workers, captions

    def __len__(self) -> int:
        """Global batches this epoch (what the DataLoader yields, and a progress bar's total)."""
        return batches_per_epoch(self.dataset, self.batch_size, self.num_workers)

    def __iter__(self) -> Iterator[RankBatch]:
        pending: list[tuple[dict[str, np.ndarray], int]] = []
        for position in self.dataset.positions():
            pending.append(position)
            if len(pending) == self.batch_size:
                yield self._share(pending)
                pending = []
        if pending:
            yield self._share(pending)

    def _share(self, positions: list[tuple[dict[str, np.ndarray], int]]) -> RankBatch:
        lo, hi = share_bounds(len(positions), self.rank, self.world_size)
        with_next = self.dataset.with_next
        if hi > lo:
            share = collate([_sample(z, i, with_next) for z, i in positions[lo:hi]])
        else:
            share = _empty_batch(positions[0][0], with_next)
        captions = [str(z["captions"][i]) for z, i in positions] if self.captions else None
        return RankBatch(share, len(positions), captions)


def _unchanged(item: RankBatch) -> RankBatch:
    return item


def make_loader(dataset: ShardedDataset, batch_size: int, num_workers: int = 0,
                pin_memory: bool | None = None, *, rank: int = 0, world_size: int = 1,
                captions: bool = False) -> DataLoader:
    """A DataLoader of `RankBatch` items: for each global batch of ``batch_size`` samples of ``dataset``,
    this rank's share (see `RankBatches`); workers split the shards (each cuts its own global batches).
    ``len()`` of the loader is the number of global batches this epoch (after ``set_epoch``).

    ``pin_memory`` (default: whether CUDA is available) puts batches in page-locked memory, so the
    copy to the GPU can overlap compute (``non_blocking``)."""
    workers = min(num_workers, len(dataset.shards))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    batches = RankBatches(dataset, batch_size, rank, world_size, workers, captions)
    # forkserver, not fork: the caller may already run threads (a Prefect API server, a progress
    # bar's monitor), and a fork of a threaded process can leave a worker holding a lock forever.
    # Workers are not persistent: each keeps its own copy of the dataset, and the epoch that
    # `ShardedDataset.set_epoch` sets (the shuffle order) would never reach a worker started before it.
    # Each worker keeps a few batches ready (decompressing a shard is the slow part).
    # batch_size=None: `RankBatches` already yields collated batches.
    return DataLoader(batches, batch_size=None, num_workers=workers, collate_fn=_unchanged,
                      persistent_workers=False, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None,
                      multiprocessing_context="forkserver" if workers else None)


def batches_per_epoch(dataset: ShardedDataset, batch_size: int, num_workers: int = 0) -> int:
    """Global batches of ``batch_size`` in this epoch: each DataLoader worker's stream ends in its own
    partial batch, so with workers this can exceed ``ceil(len(dataset) / batch_size)``."""
    workers = min(num_workers, len(dataset.shards))
    return sum(-(-n // batch_size) for n in dataset.worker_sizes(workers))
