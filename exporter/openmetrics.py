"""OpenMetrics text with sample timestamps, spooled to disk so that history of any length is grouped
by family and by series without being held in memory.

A backfill learns its samples schedule by schedule, each schedule's step by step, while OpenMetrics
wants every family contiguous and, inside it, every series contiguous and in time order. So each
open *group* (one schedule) writes each of its series to a file of its own in time order; when the
group closes, those files are appended, series after series, to their family's spool file. The
output is then the families' spools one after another, each under its `# HELP` and `# TYPE`, and
`# EOF`. Memory holds file handles and the family list, never the samples.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, BinaryIO

__all__ = ["Group", "Spool", "escape", "number", "sample_line"]


def escape(text: str) -> str:
    """A label value or HELP text as OpenMetrics writes it: backslash, double quote and newline escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value: float) -> str:
    """A value as OpenMetrics writes it: `12` for a whole number, else Python's shortest repr, `+Inf`, `NaN`."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def sample_line(name: str, labels: Mapping[str, str], value: float, timestamp: float) -> str:
    """One sample with its timestamp in seconds (whole seconds written as an integer)."""
    rendered = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
    series = f"{name}{{{rendered}}}" if rendered else name
    return f"{series} {number(value)} {number(timestamp)}\n"


@dataclass
class _Family:
    name: str
    help: str
    spool: Path
    file: BinaryIO | None = None  # opened on its first series
    samples: int = 0


@dataclass
class Group:
    """The series of one schedule, each spooled to its own file until the group closes. Samples of a
    series must come in time order; different series may interleave."""

    spool: Spool
    files: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[_Family, Path, BinaryIO]] = field(default_factory=dict)

    def add(self, family: str, labels: Mapping[str, str], value: float, timestamp: float) -> None:
        """A sample of a declared family (KeyError for an undeclared one: a bug, never a silent drop)."""
        key = (family, tuple(labels.items()))
        entry = self.files.get(key)
        if entry is None:
            declared = self.spool.families[family]
            path = self.spool.directory / f"series-{self.spool.next_id()}"
            entry = self.files[key] = (declared, path, open(path, "wb"))  # noqa: SIM115 (closed in close())
        declared, _, handle = entry
        handle.write(sample_line(family, labels, value, timestamp).encode())
        declared.samples += 1

    def close(self) -> None:
        """Append every series, in the order they first appeared, to its family's spool."""
        for declared, path, handle in self.files.values():
            handle.close()
            if declared.file is None:
                declared.file = open(declared.spool, "ab")  # noqa: SIM115 (closed by Spool.close)
            with open(path, "rb") as series:
                shutil.copyfileobj(series, declared.file)
            path.unlink()
        self.files.clear()

    def discard(self) -> None:
        """Close the files of an abandoned group (interrupted); the spool directory goes with them."""
        for _, _, handle in self.files.values():
            handle.close()
        self.files.clear()


class Spool:
    """Families in the order declared, their samples on disk in a private directory under `parent`."""

    def __init__(self, parent: Path) -> None:
        # Next to the output, so the final rename stays on one file system; hidden, and removed on close.
        self.directory = Path(tempfile.mkdtemp(prefix=".backfill-spool-", dir=parent))
        self.families: dict[str, _Family] = {}
        self._ids = 0

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def declare(self, name: str, help_text: str) -> None:
        """A gauge family, written in declaration order if it gets any sample; the first HELP wins."""
        if name not in self.families:
            self.families[name] = _Family(name, help_text, self.directory / f"family-{self.next_id()}")

    def group(self) -> Group:
        return Group(self)

    @property
    def samples(self) -> int:
        return sum(f.samples for f in self.families.values())

    def write(self, out: IO[bytes]) -> None:
        """The whole exposition: every family with samples, then `# EOF`."""
        for family in self.families.values():
            if family.file is None:
                continue
            family.file.flush()
            out.write(f"# HELP {family.name} {escape(family.help)}\n# TYPE {family.name} gauge\n".encode())
            with open(family.spool, "rb") as spooled:
                shutil.copyfileobj(spooled, out)
        out.write(b"# EOF\n")

    def write_file(self, target: Path) -> None:
        """Write to a temporary file beside `target`, then rename it into place: an interruption or
        a crash leaves the old file (or none), never half of a new one."""
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            # mkstemp makes it 0600; the output gets the mode any new file would (promtool may run as
            # another user than the backfill).
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(handle, 0o666 & ~umask)
            with os.fdopen(handle, "wb") as out:
                self.write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        for family in self.families.values():
            if family.file is not None:
                family.file.close()
                family.file = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
