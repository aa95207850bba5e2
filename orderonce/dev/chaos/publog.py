"""The publisher's own record of every publish attempt, kept outside the system under test (a
JSON-lines file), so the checks never rely on what the workers say about themselves."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

from orderonce.dev.chaos.workload import Publication

Outcome = Literal["ok", "failed", "unknown"]


@dataclass(frozen=True)
class Attempt:
    seq: int
    sha256: str
    kind: str
    identity: tuple[str, str] | None
    group: str | None
    outcome: Outcome


def body_sha256(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


class PublishLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("ab")
        self._seq = 0
        self._lock = threading.Lock()

    def record(self, publications: list[Publication], outcome: Outcome) -> None:
        with self._lock:
            for p in publications:
                self._seq += 1
                line = {
                    "seq": self._seq,
                    "sha256": body_sha256(p.body),
                    "kind": p.kind,
                    "identity": p.identity,
                    "group": p.group,
                    "outcome": outcome,
                }
                self._file.write(orjson.dumps(line) + b"\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def read(path: Path) -> Iterator[Attempt]:
    with path.open("rb") as f:
        for line in f:
            row = orjson.loads(line)
            identity = tuple(row["identity"]) if row["identity"] else None
            yield Attempt(
                row["seq"],
                row["sha256"],
                row["kind"],
                identity,
                row["group"],
                row["outcome"],
            )
