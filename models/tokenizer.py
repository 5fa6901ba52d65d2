"""Byte-level tokenizer: needs no vocabulary download, so it works offline and never drifts."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3  # byte b is token b + 3
VOCAB_SIZE = BYTE_OFFSET + 256
TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens: 0 pad, 1 bos, 2 eos, byte ``b`` at ``b + 3`` (vocabulary of 259).

    ``encode`` always returns ``max_length`` columns; text that does not fit is cut so that the
    row still ends with eos (the model relies on bos/eos framing, not on the length).
    """

    def __init__(self, max_length: int = 48) -> None:
        if max_length < 2:
            raise ValueError(f"max_length ({max_length}) must be at least 2 to hold bos and eos")
        self.max_length = max_length
        self.vocab_size = VOCAB_SIZE
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID

    def encode(self, texts: list[str]) -> torch.LongTensor:
        """Encode a batch of strings to ``LongTensor[B, max_length]`` (right-padded with 0)."""
        if isinstance(texts, str):  # a lone string is an easy mistake; treat it as a batch of one
            texts = [texts]
        ids = torch.full((len(texts), self.max_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            body = [b + BYTE_OFFSET for b in text.encode("utf-8")][: self.max_length - 2]
            seq = [BOS_ID, *body, EOS_ID]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Inverse of ``encode``: a 1-D input gives a ``str``, a 2-D input a ``list[str]``.

        Special tokens are dropped; a multi-byte character cut by truncation becomes U+FFFD.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if len(ids) > 0 and isinstance(ids[0], (list, tuple)):
            return [self._decode_one(row) for row in ids]
        return self._decode_one(ids)

    @staticmethod
    def _decode_one(ids: Sequence[int]) -> str:
        data = bytes(int(i) - BYTE_OFFSET for i in ids if BYTE_OFFSET <= int(i) < VOCAB_SIZE)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, object]:
        return {
            "type": "byte",
            "max_length": self.max_length,
            "pad_id": PAD_ID,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
            "byte_offset": BYTE_OFFSET,
            "vocab_size": VOCAB_SIZE,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``directory`` and return its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ByteTokenizer:
        """Read ``tokenizer.json`` from ``directory``."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected {TOKENIZER_FILE} in {directory}")
        spec = json.loads(path.read_text())
        # Refuse files written by a different scheme rather than silently mis-tokenising.
        expected = cls(int(spec.get("max_length", 2))).to_dict()
        if spec != expected:
            raise ValueError(f"{path} does not describe a ByteTokenizer: {spec} != {expected}")
        return cls(spec["max_length"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer) and other.to_dict() == self.to_dict()

    def __hash__(self) -> int:
        return hash(self.max_length)

    def __repr__(self) -> str:
        return f"ByteTokenizer(max_length={self.max_length})"
