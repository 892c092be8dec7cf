"""Splits the org sets among COUNT replicas by rendezvous hashing of their names, with no coordination.

Each replica keeps the org sets whose name scores highest for its index. The score is a SHA-256
of the index and the name (never Python's `hash()`, which is salted per process), so every
replica computes the same assignment, and going from COUNT to COUNT+1 replicas moves only the
~1/(COUNT+1) of the org sets that the new replica wins; the others stay where they were.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

HOSTNAME_ENV: Final = "HOSTNAME"
MAX_SHARDS: Final = 1000
_SHARD_RE: Final = re.compile(r"^\s*(auto|\d+)\s*/\s*(\d+)\s*$")
_ORDINAL_RE: Final = re.compile(r"-(\d+)$")


@dataclass(frozen=True)
class Shard:
    """This replica's place among `count` replicas; `index` counts from 0."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, name: str) -> bool:
        return owner(name, self.count) == self.index


def _score(index: int, name: str) -> int:
    digest = hashlib.sha256(f"{index}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def owner(name: str, count: int) -> int:
    """The index (0..count-1) of the replica that polls the org set `name`."""
    return max(range(count), key=lambda index: _score(index, name))


def parse_shard(text: str, env: Mapping[str, str]) -> Shard:
    """`INDEX/COUNT`, or `auto/COUNT` (the index is the trailing `-N` of $HOSTNAME, as in a
    StatefulSet pod name like `devin-usage-exporter-2`); ValueError with the reason otherwise."""
    match = _SHARD_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not INDEX/COUNT or auto/COUNT (for example 0/3 or auto/3)")
    count = int(match.group(2))
    if not 1 <= count <= MAX_SHARDS:
        raise ValueError(f"{text!r}: COUNT must be from 1 to {MAX_SHARDS}, got {count}")
    if match.group(1) == "auto":
        hostname = env.get(HOSTNAME_ENV, "")
        ordinal = _ORDINAL_RE.search(hostname)
        if ordinal is None:
            raise ValueError(
                f"{text!r}: auto takes the index from ${HOSTNAME_ENV}'s trailing -N (a StatefulSet "
                f"pod name such as devin-usage-exporter-2), but {HOSTNAME_ENV} is {hostname!r}")
        index = int(ordinal.group(1))
        if index >= count:
            raise ValueError(f"{text!r}: {HOSTNAME_ENV} {hostname!r} gives index {index}, "
                             f"but there are only {count} shards (0..{count - 1})")
        return Shard(index, count)
    index = int(match.group(1))
    if index >= count:
        raise ValueError(f"{text!r}: INDEX must be from 0 to {count - 1} for {count} shards, got {index}")
    return Shard(index, count)
