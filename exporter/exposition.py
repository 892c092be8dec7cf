"""Serves /metrics from cached renderings: an org set's series are re-rendered when they change.

Rendering 20,000 usage series with prometheus_client takes ~0.3 s, and gzip on top adds more; doing
that on every scrape would make the exporter cost more than what it watches. So the output is
kept as bytes, per content type:

- a *chunk* per org set (and one per org set's API counters): that org set's samples of each
  family, rendered by prometheus_client's own encoder, so the bytes are exactly its format (the
  enterprise-level collectors' results are one more "org set", plan.ENTERPRISE, rendered alike). A
  chunk is reused while what it was rendered from is the same (the config and the snapshot's
  results of that org set, compared by identity; the org set's API stats version) and, for usage
  series, until the earliest time one of them goes stale (the collector's injected clock decides,
  as it would uncached).
- a *segment* (usage, health, API families): its chunks merged by family, kept as blocks of the
  lines of ~16 org sets per family, so one org set's change rebuilds a few KiB. Once two formats
  are scraped, blocks are kept once by content across them (see _Shared).
- a *body*: the segments' blocks at one moment, frozen, and — for gzip, made once — each block
  deflated with a sync flush (a block that did not change reuses its previous deflate) and the
  CRC-32 of them all. A plain scrape sends the blocks themselves, joined a few hundred KiB at a
  time as it writes them: no joined copy of the body is kept.

The exporter's own small families (build info, reload status, process_*, python_*) are rendered
on every scrape. A gzip response is one gzip member: header, the body's deflate blocks, the fresh
tail, a final empty block, then CRC-32 and length (RFC 1951/1952; pigz assembles streams the same
way) — not several members, which some clients (curl) stop reading after the first of.

A format that is scraped regularly is kept up to date by a background task (Exposition.run), which
renders in slices of at most SLICE_SECONDS of CPU so that polling keeps going. While it runs, a
scrape sends the newest finished body if it is at most MAX_LAG_SECONDS behind rather than wait
for the next one: a scrape does not wait on rendering, at the cost of showing a poll result up to
about REFRESH_SECONDS late (never across a reload or a staleness horizon). A format scraped once
in a while (curl) is rendered by its scrape, up to date.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import re
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from aiohttp import hdrs, web
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import ALLOWUTF8, UNDERSCORES
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from exporter.catalogue import CATALOGUE
from exporter.collector import ApiStats, ExporterCollector, register_runtime_collectors
from exporter.plan import Plan, plan_of
from exporter.snapshot import ENTERPRISE, Snapshot

Encoder = Callable[[Collector], bytes]
log = logging.getLogger(__name__)

# Deflate level of cached pieces: each piece is compressed once, so a higher level costs little.
GZIP_LEVEL: Final = 6
# How long the process_* and python_* values a scrape sends may be reused (see _Fresh).
RUNTIME_SECONDS: Final = 1.0
# Content types kept at once; Prometheus uses one, a person with curl or a browser another.
MAX_FORMATS: Final = 4
# Chunks per block on average. Smaller blocks recompress less after a change; larger ones compress
# better (each piece starts with an empty dictionary).
BLOCK_CHUNKS: Final = 16
# Bodies up to this size are joined into one buffer, once per body and tail, and sent in one
# write; larger ones are sent from their cached parts (joining them would keep a second copy of
# megabytes: 18 MiB of plain text at 1,000 org sets).
STREAM_ABOVE: Final = 4 << 20
# How often the formats in use are brought up to date in the background (see Exposition.run), and
# how long after its last scrape a format stops being kept up to date.
REFRESH_SECONDS: Final = 0.25
FORMAT_IDLE_SECONDS: Final = 600.0
# Rendering lets the event loop run after this much CPU time, or this many chunks, whichever comes
# first: a full render of 1,000 org sets (~0.5 s) must not stall the poller or scrapes for its
# duration, and while polling, a scrape waits at most one slice.
SLICE_SECONDS: Final = 0.0003
RENDERS_PER_YIELD: Final = 32
# While a format is kept up to date in the background, a scrape sends its newest body if that was
# last known to be up to date at most this long ago (so its results are at most this late),
# instead of waiting for a render. Older (the background task fell behind), it waits.
MAX_LAG_SECONDS: Final = 1.0
# What a large response is written in: its parts joined into pieces of about this size, one at a
# time, so that a plain scrape copies a few hundred KiB at once rather than keep a joined body.
PIECE_BYTES: Final = 256 * 1024

_GZIP_HEADER: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, OS unknown
_EOF: Final = b"# EOF\n"
_HELP_LINE: Final = re.compile(rb"^# HELP ", re.MULTILINE)


def _final_block() -> bytes:
    return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS).flush()  # b"\x03\x00"


_FINAL_BLOCK: Final = _final_block()


def _deflate(data: bytes) -> bytes:
    """Raw deflate of `data`, byte-aligned and not final, so it can be followed by more blocks."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


class _Families(Collector):
    """A fixed list of families, posing as a collector for the encoder."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class _Unsplittable(Exception):
    """The encoder's output did not have one `# HELP` line per family; render uncached."""


def _split(output: bytes, families: Sequence[Metric]) -> dict[str, tuple[bytes, bytes]]:
    """Encoder output -> family name -> (header lines, sample lines), in output order.

    Sample lines never start with `#` (a name, or `{` for a quoted UTF-8 name; newlines in label
    values are escaped), so each family is its `# HELP` line up to the next one.
    """
    if output.endswith(_EOF):
        output = output[: -len(_EOF)]
    if not families and not output:
        return {}
    starts = [m.start() for m in _HELP_LINE.finditer(output)]
    if len(starts) != len(families) or not starts or starts[0] != 0:
        raise _Unsplittable(f"{len(starts)} HELP lines for {len(families)} families")
    out: dict[str, tuple[bytes, bytes]] = {}
    for family, start, end in zip(families, starts, [*starts[1:], len(output)], strict=True):
        block = output[start:end]
        header_end = 0
        while block.startswith(b"#", header_end):
            header_end = block.index(b"\n", header_end) + 1
        out[family.name] = (block[:header_end], block[header_end:])
    return out


class _Chunk:
    """One org set's rendered samples of each of its families."""

    __slots__ = ("families", "names", "stats", "valid_from", "valid_until")

    def __init__(self, families: dict[str, tuple[bytes, bytes]], valid_from: float = -math.inf,
                 valid_until: float = math.inf, stats: tuple[object, int] | None = None) -> None:
        # family name -> (header lines, sample lines); emptied once a segment holds the bytes
        self.families = families
        self.names = tuple(families)  # interned by the segment, so equal tuples are one object
        self.valid_from = valid_from  # usage chunks: valid from their render time ...
        self.valid_until = valid_until  # ... until their first series goes stale
        # API chunks: the org set's stats object and its version when rendered. (Usage and health
        # chunks are matched to the snapshot's results by the body, see Exposition._rebuild.)
        self.stats = stats


class _Shared:
    """Every block of every format's segments, by content, once a second format is scraped: text
    and OpenMetrics write the same sample lines for this exporter's names, so the second format
    (Prometheus, and a person with curl) holds no second copy of the megabytes. With one format it
    holds nothing (one format gains nothing, and keeping replaced blocks until a prune costs)."""

    __slots__ = ("blocks", "live", "on")

    def __init__(self) -> None:
        self.blocks: dict[bytes, bytes] = {}
        self.live = 0  # how many were alive at the last prune
        self.on = False

    def one(self, block: bytes) -> bytes:
        """`block`, or the equal block already kept."""
        return self.blocks.setdefault(block, block) if self.on else block

    def prune(self, segments: Iterable[_Segment]) -> None:
        """Keep only the blocks of `segments`, once the others are a fifth of the table (each costs
        memory until then; a prune looks at every block, ~1 ms at 1,000 org sets)."""
        if self.on and len(self.blocks) > 1.25 * self.live + 256:
            self.share(segments)

    def share(self, segments: Iterable[_Segment]) -> None:
        """Keep exactly the blocks of `segments`, and from now on make equal blocks one."""
        live = {block: block for segment in segments for block in segment.blocks()}
        self.blocks.clear()
        self.blocks.update(live)
        self.live, self.on = len(live), True


class _Column:
    """One family's sample lines for every org set of a segment, kept as bytes in blocks of
    BLOCK_CHUNKS org sets with each org set's end offset, so one org set's lines are replaced by
    rebuilding a few KiB, and a scrape joins tens of blocks rather than thousands of pieces."""

    __slots__ = ("_shared", "blocks", "ends")

    def __init__(self, shared: _Shared, cells: list[bytes] | None = None) -> None:
        self.blocks: list[bytes] = []
        self.ends: list[list[int]] = []
        self._shared = shared  # blocks by content, across formats (see _Shared)
        for _ in self.fill(cells or []):
            pass

    def fill(self, cells: list[bytes]) -> Iterator[None]:
        """Append `cells` as blocks, stopping after each block so that a caller can let the event
        loop run: a whole segment at 1,000 org sets is megabytes, ~50 ms to join in one go."""
        for start in range(0, len(cells), BLOCK_CHUNKS):
            block = cells[start:start + BLOCK_CHUNKS]
            joined = b"".join(block)
            self.blocks.append(self._shared.one(joined))
            self.ends.append(list(itertools.accumulate(map(len, block))))
            yield

    def set(self, index: int, samples: bytes) -> None:
        number, cell = divmod(index, BLOCK_CHUNKS)
        ends, raw = self.ends[number], self.blocks[number]
        start, end = ends[cell - 1] if cell else 0, ends[cell]
        if raw[start:end] == samples:
            return
        joined = b"".join((raw[:start], samples, raw[end:]))
        self.blocks[number] = self._shared.one(joined)
        delta = len(samples) - (end - start)
        for k in range(cell, len(ends)):
            ends[k] += delta


class _Segment:
    """A group of families (usage, health or API) whose samples come from many org sets.

    Families are in the order in which they first appear scanning the org sets, each family's
    samples in org set order — what rendering them all at once gives. Replacing an org set's
    chunk touches only its own lines.
    """

    def __init__(self, skeleton: dict[str, tuple[bytes, bytes]], shared: _Shared) -> None:
        self._shared = shared  # blocks by content, across formats (see _Shared)
        self._skeleton = list(skeleton)  # families present even with no org set
        self._headers = {name: header for name, (header, _) in skeleton.items()}
        self.names: list[str] = []  # org sets, in output order
        self.chunks: list[_Chunk] = []
        self._columns: dict[str, _Column] = {}
        self._order: list[str] = list(skeleton)
        self._interned: dict[tuple[str, ...], tuple[str, ...]] = {}

    def reset(self, names: list[str], chunks: list[_Chunk]) -> Iterator[None]:
        """Make this (fresh) segment hold `chunks`, stopping every few chunks and after each block
        so that the caller can let the event loop run; done when exhausted (see Exposition._steps)."""
        self.names, self.chunks = names, chunks
        # A reload may change a header (the usage HELP text names the poll interval).
        self._headers = {name: self._headers[name] for name in self._skeleton}
        cells: dict[str, list[bytes]] = {}
        for index, chunk in enumerate(chunks):
            chunk.names = self._interned.setdefault(chunk.names, chunk.names)
            for name, (header, samples) in chunk.families.items():
                if name not in cells:
                    cells[name] = [b""] * len(chunks)
                    self._headers[name] = header
                cells[name][index] = samples
            chunk.families = {}  # the column holds the bytes now
            if index % BLOCK_CHUNKS == BLOCK_CHUNKS - 1:
                yield
        self._columns = {}
        for name, column in cells.items():
            self._columns[name] = _Column(self._shared)
            yield from self._columns[name].fill(column)
        self._reorder()

    def fresh(self) -> _Segment:
        """An empty segment of the same families, to `reset` while this one is still in use."""
        segment = _Segment({}, self._shared)
        segment._skeleton = self._skeleton
        segment._headers = dict(self._headers)
        segment._order = list(self._skeleton)
        segment._interned = self._interned
        return segment

    def replace(self, index: int, chunk: _Chunk) -> None:
        old = self.chunks[index]
        self.chunks[index] = chunk
        chunk.names = self._interned.setdefault(chunk.names, chunk.names)
        for name in old.names:
            if name not in chunk.families:
                self._columns[name].set(index, b"")
        for name, (header, samples) in chunk.families.items():
            column = self._columns.get(name)
            if column is None:  # a family no org set had before (an extra API field)
                column = self._columns[name] = _Column(self._shared, [b""] * len(self.chunks))
                self._headers[name] = header
            column.set(index, samples)
        chunk.families = {}
        if chunk.names is not old.names:
            self._reorder()  # a family may have appeared or gone

    def take(self, index: int) -> _Chunk:
        """The chunk at `index` with its bytes as a fresh chunk holds them, to reuse under a new config."""
        chunk = self.chunks[index]
        number, cell = divmod(index, BLOCK_CHUNKS)
        families = {}
        for name in chunk.names:
            column = self._columns[name]
            ends = column.ends[number]
            families[name] = (self._headers[name], column.blocks[number][ends[cell - 1] if cell else 0:ends[cell]])
        return _Chunk(families, chunk.valid_from, chunk.valid_until, chunk.stats)

    def _reorder(self) -> None:
        order = dict.fromkeys(self._skeleton)
        seen: tuple[str, ...] | None = None
        for chunk in self.chunks:
            if chunk.names is not seen:  # most org sets have the same families: one identity test
                seen = chunk.names
                for name in seen:
                    order.setdefault(name)
        self._order = list(order)

    def blocks(self) -> Iterator[bytes]:
        for column in self._columns.values():
            yield from column.blocks

    def parts(self) -> Iterator[bytes]:
        """The segment's bytes as they stand, in pieces: each family's header lines, then its blocks."""
        for name in self._order:
            yield self._headers[name]
            column = self._columns.get(name)
            if column is not None:
                yield from column.blocks


@dataclass(frozen=True)
class _Deflated:
    """A body's bytes as raw deflate blocks (byte-aligned, not final), with their CRC-32 and length."""

    blocks: bytes
    crc: int
    size: int


@dataclass(eq=False)
class _Prepared:
    """A format's usage and health segments rendered for a config about to be switched to (see
    Exposition.prepare), kept aside until the switch: the running config's stay as they are."""

    snapshot: Snapshot  # of the new config, with the results of just before the switch
    valid_from: float
    valid_until: float
    usage: _Segment
    health: _Segment


@dataclass(eq=False)
class _Body:
    """What a scrape of one content type sends, for one snapshot and API stats version: the
    segments' parts frozen at render time (the segments change afterwards, this does not), and
    the encodings scrapes asked for, each made once."""

    snapshot: Snapshot
    stats_version: int
    valid_from: float
    valid_until: float  # the staleness horizon: the earliest time a published usage series expires
    current_at: float  # monotonic time it was last known to be up to date
    parts: tuple[bytes, ...]
    plan: Plan  # of snapshot.config, so a reload can tell which org sets' schedules stayed the same
    deflated: _Deflated | None = None  # for gzip scrapes; plain ones send `parts` as they are

    # gzip or not -> (the tail, the response parts made with it): the tail is the same bytes object
    # while its values are (see _Tail), and then so is the response; scrapes copy and compress nothing.
    responses: dict[bool, tuple[bytes, list[bytes]]] = field(default_factory=dict)

    def has(self, *, gzip: bool) -> bool:
        return self.deflated is not None or not gzip

    def response(self, tail: bytes, *, gzip: bool) -> list[bytes]:
        """What a scrape sends: the body with `tail` after it, as one buffer unless it is large."""
        made = self.responses.get(gzip)
        if made is not None and made[0] is tail:
            return made[1]
        parts = self._gzip_parts(tail) if gzip else self._plain_parts(tail)
        if sum(map(len, parts)) <= STREAM_ABOVE:  # one write, headers included: cheaper than several
            parts = [b"".join(parts)]
        self.responses[gzip] = (tail, parts)
        return parts

    def _plain_parts(self, tail: bytes) -> list[bytes]:
        return [*self.parts, tail]

    def _gzip_parts(self, tail: bytes) -> list[bytes]:
        """One gzip member: the body's deflate blocks, then `tail` compressed."""
        deflated = self.deflated
        assert deflated is not None
        trailer = struct.pack("<II", zlib.crc32(tail, deflated.crc), (deflated.size + len(tail)) & 0xFFFFFFFF)
        return [_GZIP_HEADER, deflated.blocks, _deflate(tail) + _FINAL_BLOCK + trailer]


_LEGACY_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _fast_encoder(encoder: Encoder) -> Encoder | None:
    """The same format without per-character escaping of names, where that gives the same bytes.

    OpenMetrics with escaping=underscores (what Prometheus 2 negotiates) rewrites every sample
    name one character at a time, which is most of the cost of rendering an org set. For names
    made only of [a-zA-Z0-9_] that rewrite changes nothing, and escaping=allow-utf-8 writes them
    as they are; all of this exporter's metric and label names are such names (fixed, or checked
    by config.py and metrics.py), and render() checks each chunk's before using it.
    """
    if (isinstance(encoder, functools.partial) and encoder.func is generate_openmetrics
            and encoder.keywords.get("escaping") == UNDERSCORES):
        return functools.partial(encoder.func, *encoder.args, **{**encoder.keywords, "escaping": ALLOWUTF8})
    return None


def _legacy_names(families: Sequence[Metric]) -> bool:
    names = {family.name for family in families}
    for family in families:
        for sample in family.samples:
            names.add(sample.name)
            names.update(sample.labels)
    return all(_LEGACY_NAME.fullmatch(name) for name in names)


class _Format:
    """Everything cached for one negotiated content type."""

    def __init__(self, encoder: Encoder, collector: ExporterCollector, snap: Snapshot,
                 fresh: Collector, shared: _Shared) -> None:
        self.encoder = encoder
        self._fast = _fast_encoder(encoder)
        self.tail = _Tail(fresh, encoder)
        self._headers: dict[bytes, bytes] = {}
        self.usage = _Segment({}, shared)
        self.health = _Segment(self.render(collector.health_families(snap, ())), shared)
        self.api = _Segment(self.render(collector.api_families(())), shared)
        self.body: _Body | None = None  # the newest finished body; its lines never change once set
        self.lock = asyncio.Lock()
        self.splittable = True
        self.last_used = -math.inf  # monotonic time a scrape last asked for this format
        self.gap: float | None = None  # seconds between its last two scrapes
        self.gzip = False  # whether one asked for it gzip-compressed
        # Raw block -> its deflate, for the blocks of the newest body: a block that did not change
        # is the same bytes object in the next body, found here by identity before equality.
        self.deflated: dict[bytes, bytes] = {}
        self.pending: _Prepared | None = None  # rendered for the config a reload is about to switch to

    def render(self, families: Sequence[Metric]) -> dict[str, tuple[bytes, bytes]]:
        encoder = self._fast if self._fast is not None and _legacy_names(families) else self.encoder
        rendered = _split(encoder(_Families(families)), families)
        # Every org set's chunk repeats the same HELP/TYPE lines: keep one copy of each (at 1,000
        # org sets that is megabytes). A reload can change them, so the table is bounded, not fixed.
        if len(self._headers) > 1000:
            self._headers.clear()
        return {name: (self._headers.setdefault(header, header), samples)
                for name, (header, samples) in rendered.items()}


class _Fresh(Collector):
    """Families rendered on every scrape: small, and they change all the time (process CPU, memory).

    The process_* and python_* ones are read at most every RUNTIME_SECONDS: reading /proc was a
    fifth of a small scrape's cost, and nobody scrapes faster than that for CPU seconds.
    """

    def __init__(self, collector: ExporterCollector, monotonic: Callable[[], float]) -> None:
        self._collector = collector
        self._monotonic = monotonic
        # Twins of the app registry's: they only read /proc and the interpreter.
        self._runtime = CollectorRegistry(auto_describe=False)
        register_runtime_collectors(self._runtime)
        self._read_at = -math.inf
        self._runtime_families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self._collector.exporter_families()
        now = self._monotonic()
        if not 0 <= now - self._read_at < RUNTIME_SECONDS:
            self._runtime_families, self._read_at = list(self._runtime.collect()), now
        yield from self._runtime_families


class _Tail:
    """The per-scrape families in one format. Their layout (families, sample names and labels)
    does not change between scrapes, only their values: the encoder renders them once, and later
    scrapes format only the new values into that layout, with the encoder's own float format, in
    about a third of the encoder's time. Any change of layout renders with the encoder again."""

    def __init__(self, fresh: Collector, encoder: Encoder) -> None:
        self._fresh = fresh
        self._encoder = encoder
        self._layout: list[tuple[str, dict[str, str]]] | None = None  # (sample name, labels) in order
        # The text before each sample's value, then the text after the last one.
        self._pieces: list[bytes] = []
        # The last output, the same object while the values it was made of are the same.
        self._values: list[float] | None = None
        self._output = b""

    def render(self) -> bytes:
        families = list(self._fresh.collect())
        samples = [sample for family in families for sample in family.samples]
        if self._fits(samples):
            values = [sample.value for sample in samples]
            if values == self._values:  # the runtime values are re-read once a second: mostly the same
                return self._output
            parts: list[bytes] = []
            for piece, value in zip(self._pieces[:-1], values, strict=True):
                parts += (piece, _value(value))
            parts.append(self._pieces[-1])
            self._values, self._output = values, b"".join(parts)
            return self._output
        output = self._encoder(_Families(families))
        self._learn(output, samples)
        self._values, self._output = None, output
        return output

    def _fits(self, samples: list[Sample]) -> bool:
        layout = self._layout
        return layout is not None and len(layout) == len(samples) and all(
            s.name == name and s.labels == labels and _plain(s)
            for s, (name, labels) in zip(samples, layout, strict=True))

    def _learn(self, output: bytes, samples: list[Sample]) -> None:
        """Cut `output` before each sample's value; no layout if a line is not `NAME{LABELS} VALUE`."""
        self._layout = None
        pieces: list[bytes] = []
        text = b""
        remaining = iter(samples)
        for line in output.splitlines(keepends=True):
            if line.startswith(b"#"):
                text += line
                continue
            sample = next(remaining, None)
            suffix = b" " + _value(sample.value) + b"\n" if sample is not None else b""
            if sample is None or not _plain(sample) or not line.endswith(suffix):
                return
            pieces.append(text + line[: -len(suffix) + 1])
            text = b"\n"
        if next(remaining, None) is not None:
            return
        pieces.append(text)
        self._pieces, self._layout = pieces, [(s.name, dict(s.labels)) for s in samples]


def _value(value: float) -> bytes:
    """A sample value as both prometheus_client encoders write it."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text.encode()


def _plain(sample: Sample) -> bool:
    return sample.timestamp is None and sample.exemplar is None and sample.native_histogram is None


class Exposition:
    """Renders the registry's exposition from cached bytes; same output as `registry` renders itself."""

    def __init__(self, collector: ExporterCollector, snapshot: Callable[[], Snapshot], stats: ApiStats,
                 registry: CollectorRegistry, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, max_lag: float = MAX_LAG_SECONDS) -> None:
        self._collector = collector
        self._monotonic = monotonic
        self._snapshot = snapshot
        self._stats = stats
        self.registry = registry  # the uncached path (name filter, --once) renders this
        self._clock = clock
        self._fresh = _Fresh(collector, monotonic)
        self._formats: OrderedDict[str, _Format] = OrderedDict()
        self._shared = _Shared()
        self.renders = 0  # chunks rendered since start; tests use it to see what a scrape re-rendered
        self._renders_since_yield = 0
        self._slice_started = time.perf_counter()  # CPU slices, not a clock the output depends on
        self._refresh_every: float | None = None  # while run() keeps formats up to date: its period
        self.max_lag = max_lag  # 0: a scrape always waits for an up-to-date body

    async def run(self, *, every: float = REFRESH_SECONDS,
                  sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Keep the formats scrapers ask for rendered as the snapshot changes (until cancelled).

        Without this, a scrape renders everything that changed since the previous one: at the
        start of a big poll cycle that is most of the org sets, so the scrape would wait on it.
        Rendering what changed every `every` seconds costs about the same in total, and while
        this runs a scrape sends the newest body without waiting (see _may_lag). Only formats
        scraped regularly are kept up to date (see _kept): a one-off `curl` must not double the
        rendering work for good.
        """
        failing = False
        self._refresh_every = every
        try:
            while True:
                await sleep(every)
                try:
                    await self.refresh(every)
                except Exception:
                    if not failing:
                        log.exception("rendering /metrics in the background failed; scrapes render it themselves")
                    failing = True
                else:
                    failing = False
        finally:
            self._refresh_every = None

    async def refresh(self, every: float = REFRESH_SECONDS) -> None:
        """Bring up to date, as its next scrape would, every format that is being scraped regularly."""
        now = self._monotonic()
        for fmt in list(self._formats.values()):
            if fmt.body is not None and self._kept(fmt, now, every):
                await self._body(fmt, gzip=fmt.gzip)

    async def prepare(self, snap: Snapshot) -> None:
        """Render, before a reload switches to `snap`'s config, what its bodies need of it.

        Called with the snapshot the switch will make (the new config, the results it keeps), for
        the formats kept up to date: their org sets are rendered for the new config now, in slices,
        while scrapes go on getting the running config's bodies. After the switch, a scrape then
        waits only for the org sets whose results came in meanwhile (and the API counters), not
        for the re-render of every org set the reload changed (~0.2 s at 1,000 org sets) — and a
        scrape still never gets a body of the old config after the switch, nor a mix of both.
        """
        every = self._refresh_every
        if every is None:
            return
        for fmt in list(self._formats.values()):
            if fmt.body is None or not fmt.splittable or not self._kept(fmt, self._monotonic(), every):
                continue
            async with fmt.lock:
                self._slice_started = time.perf_counter()
                now = self._clock()
                try:
                    usage, health = await self._reconfigured(fmt, fmt.body, snap, now)
                except _Unsplittable:
                    fmt.splittable = False
                    continue
                fmt.pending = _Prepared(snap, *_validity(usage.chunks), usage, health)

    @staticmethod
    def _kept(fmt: _Format, now: float, every: float) -> bool:
        """Scraped at least twice, and last less than two of its scrape intervals ago (at most
        FORMAT_IDLE_SECONDS): the background refresh keeps this format up to date."""
        return fmt.gap is not None and now - fmt.last_used <= min(2 * fmt.gap + every, FORMAT_IDLE_SECONDS)

    async def render(self, accept: str = "", *, gzip: bool = False) -> tuple[list[bytes], str]:
        """The body for an `Accept` header value (gzip-compressed if asked), as parts to send one
        after the other, and its Content-Type."""
        encoder, content_type = choose_encoder(accept)
        fmt = self._formats.get(content_type)
        if fmt is None:
            try:
                fmt = _Format(encoder, self._collector, self._snapshot(), self._fresh, self._shared)
            except _Unsplittable:
                fmt = None
            else:
                self._formats[content_type] = fmt
                if len(self._formats) == 2:
                    self._shared.share(self._segments())
                while len(self._formats) > MAX_FORMATS:
                    self._formats.popitem(last=False)
        body = None
        if fmt is not None:
            fmt.gzip = fmt.gzip or gzip
            body = self._current(fmt, gzip) or await self._body(fmt, gzip=gzip, scrape=True)
        if fmt is None or body is None:
            # Never expected; kept so that a change in prometheus_client cannot break /metrics.
            output = encoder(self.registry)
            return [_gzip_whole(output) if gzip else output], content_type
        self._formats.move_to_end(content_type)
        now = self._monotonic()
        if fmt.last_used > -math.inf:
            fmt.gap = now - fmt.last_used
        fmt.last_used = now
        return body.response(fmt.tail.render(), gzip=gzip), content_type

    def _current(self, fmt: _Format, gzip: bool) -> _Body | None:
        """The format's newest body if a scrape may send it now: up to date, or — while the
        background refresh keeps this format up to date — late by at most `max_lag` seconds."""
        body = fmt.body
        if body is None or not body.has(gzip=gzip):
            return None
        if self._fresh_enough(body):
            body.current_at = self._monotonic()
            return body
        return body if self._may_lag(fmt, body) else None

    def _may_lag(self, fmt: _Format, body: _Body) -> bool:
        every = self._refresh_every
        now = self._monotonic()
        return (self.max_lag > 0 and every is not None and self._kept(fmt, now, every)
                and now - body.current_at <= self.max_lag
                # Never across a reload (new org sets, labels, help text) or past a staleness horizon.
                and body.snapshot.config is self._snapshot().config
                and body.valid_from <= self._clock() <= body.valid_until)

    async def _body(self, fmt: _Format, *, gzip: bool, scrape: bool = False) -> _Body | None:
        """The format's body, up to date, with the encodings asked for made; None if it cannot be cached.

        A `scrape` that waited for the lock takes the body made meanwhile if it may send one that
        late (see _current): right after a reload, the background refresh is rendering the new
        config's body, and the scrape must not then wait for one more render of the poll results
        that came in while it waited."""
        async with fmt.lock:  # one render per content type at a time; a waiter reuses its result
            if not fmt.splittable:
                return None
            made = self._current(fmt, gzip) if scrape else None
            if made is not None:
                return made
            self._slice_started = time.perf_counter()  # a slice counts from here, not from the last yield
            body = fmt.body
            if body is not None and self._fresh_enough(body):
                body.current_at = self._monotonic()
            else:
                try:
                    body = await self._rebuild(fmt)
                except _Unsplittable:
                    fmt.splittable = False
                    return None
            if gzip and body.deflated is None:
                body.deflated = await self._deflate_parts(fmt, body.parts)
            fmt.body = body  # only now: until here, scrapes that may lag send the previous one
            self._shared.prune(self._segments())
            return body

    def _segments(self) -> Iterator[_Segment]:
        """Every segment the formats hold, those prepared for a reload included."""
        for fmt in self._formats.values():
            yield fmt.usage
            yield fmt.health
            yield fmt.api
            if fmt.pending is not None:
                yield fmt.pending.usage
                yield fmt.pending.health

    async def _deflate_parts(self, fmt: _Format, parts: Sequence[bytes]) -> _Deflated:
        """`parts` as deflate blocks, compressing only those not in the previous body, and their CRC."""
        previous, current = fmt.deflated, dict[bytes, bytes]()
        blocks: list[bytes] = []
        crc = size = 0
        for part in parts:
            block = current.get(part)
            if block is None:
                block = previous.get(part)
                if block is None:
                    block = _deflate(part) if part else b""
                current[part] = block
            blocks.append(block)
            crc, size = zlib.crc32(part, crc), size + len(part)
            await self._pause()
        fmt.deflated = current
        return _Deflated(b"".join(blocks), crc, size)

    async def _steps(self, steps: Iterator[None]) -> None:
        """Run a piece of work written as a generator (see _Segment.reset), pausing between its steps."""
        for _ in steps:
            await self._pause()

    async def _pause(self) -> None:
        """Let the event loop run if this slice of rendering has had its SLICE_SECONDS."""
        if time.perf_counter() - self._slice_started >= SLICE_SECONDS:
            await self._yield()

    async def _rendered(self, chunks: int) -> None:
        """Count rendered chunks, and let the event loop run after RENDERS_PER_YIELD of them or
        SLICE_SECONDS: a big re-render (start-up, reload, a long-unscraped format) must not stall
        polling."""
        self.renders += chunks
        self._renders_since_yield += chunks
        if self._renders_since_yield >= RENDERS_PER_YIELD:
            await self._yield()
        else:
            await self._pause()

    async def _yield(self) -> None:
        await asyncio.sleep(0)
        self._renders_since_yield = 0
        self._slice_started = time.perf_counter()

    def _fresh_enough(self, body: _Body) -> bool:
        return (body.snapshot is self._snapshot() and body.stats_version == self._stats.version
                and body.valid_from <= self._clock() <= body.valid_until)

    async def _rebuild(self, fmt: _Format) -> _Body:
        """Re-render what changed since the format's last body: the org sets whose results are new
        objects, those past their staleness horizon, and the org sets whose API stats moved."""
        snap, now, version = self._snapshot(), self._clock(), self._stats.version
        current_at = self._monotonic()
        config, collector, previous = snap.config, self._collector, fmt.body
        # Org sets, then the enterprise-level collectors' results under their own name (ENTERPRISE).
        owners = plan_of(config).owners
        plan = plan_of(config)
        base: _Body | _Prepared | None = previous
        pending = fmt.pending
        if pending is not None and (previous is None or previous.snapshot.config is not config):
            fmt.pending = None  # the switch happened: to the config prepared for, or to another one
            if pending.snapshot.config is config and now >= pending.valid_from:
                fmt.usage, fmt.health = pending.usage, pending.health
                base = pending  # what changed since it was prepared is re-rendered below
        if base is None or base.snapshot.config is not config or now < base.valid_from:
            # A reload (or the first render) not prepared for.
            fmt.usage, fmt.health = await self._reconfigured(fmt, previous, snap, now)
        else:
            # Same config: the same org sets in the same order; find what differs from the last body.
            old, new = base.snapshot.results, snap.results

            def render_usage(index: int) -> _Chunk:
                families, horizon = collector.data_families(snap, (owners[index],), now)
                return _Chunk(fmt.render(families), now, horizon)

            changed = {i for i, name in enumerate(fmt.usage.names) if new.get(name) is not old.get(name)}
            expired = set()  # past the horizon: usage series to drop; the health series stay as they are
            if now > base.valid_until:
                expired = {i for i, c in enumerate(fmt.usage.chunks) if now > c.valid_until}
            for index in sorted(changed | expired):
                fmt.usage.replace(index, render_usage(index))
                await self._rendered(1)
                if index in changed:
                    families = collector.health_families(snap, (owners[index],))
                    fmt.health.replace(index, _Chunk(fmt.render(families)))
                    await self._rendered(1)
        valid_from, valid_until = _validity(fmt.usage.chunks)

        items = list(self._stats.items())
        if [name for name, _ in items] != fmt.api.names:  # a reload added or removed org sets
            was_at = {name: index for index, name in enumerate(fmt.api.names)}
            api = []
            for name, stats in items:
                index = was_at.get(name, -1)
                rendered = fmt.api.chunks[index].stats if index >= 0 else None
                if rendered is not None and rendered[0] is stats and rendered[1] == stats.version:
                    api.append(fmt.api.take(index))
                    await self._pause()
                    continue
                families = collector.api_families([(name, stats)])
                api.append(_Chunk(fmt.render(families), stats=(stats, stats.version)))
                await self._rendered(1)
            api_segment = fmt.api.fresh()
            await self._steps(api_segment.reset([name for name, _ in items], api))
            fmt.api = api_segment
        else:
            old_api = fmt.api.chunks
            for index, (name, stats) in enumerate(items):
                rendered = old_api[index].stats
                if rendered is None or rendered[0] is not stats or rendered[1] != stats.version:
                    # The version is read before rendering: a change during a yield re-renders.
                    families = collector.api_families([(name, stats)])
                    chunk = _Chunk(fmt.render(families), stats=(stats, stats.version))
                    fmt.api.replace(index, chunk)
                    await self._rendered(1)
        parts = tuple(part for segment in (fmt.usage, fmt.health, fmt.api) for part in segment.parts())
        return _Body(snap, version, valid_from, valid_until, current_at, parts, plan)


    async def _reconfigured(self, fmt: _Format, previous: _Body | None, snap: Snapshot,
                            now: float) -> tuple[_Segment, _Segment]:
        """The usage and health segments for `snap`, whose config is not `previous`'s (a reload, or
        the first render): org sets whose schedules, labels and results are as they were keep
        their bytes, so a reload at 1,000 org sets re-renders only what changed. The format's own
        segments are only read: the caller puts these in their place."""
        collector = self._collector
        plan = plan_of(snap.config)
        owners = plan.owners
        kept: dict[str, int] = {}
        if previous is not None and now >= previous.valid_from:
            kept = await self._unchanged(previous, snap, plan)
        usage: list[_Chunk] = []
        health: list[_Chunk] = []
        for owner in owners:
            old_index = kept.get(owner)
            if old_index is not None:
                usage.append(fmt.usage.take(old_index))
                health.append(fmt.health.take(old_index))
                await self._pause()
                continue
            families, horizon = collector.data_families(snap, (owner,), now)
            usage.append(_Chunk(fmt.render(families), now, horizon))
            await self._rendered(1)
            health.append(_Chunk(fmt.render(collector.health_families(snap, (owner,)))))
            await self._rendered(1)
        names = list(owners)
        usage_segment, health_segment = fmt.usage.fresh(), fmt.health.fresh()
        await self._steps(usage_segment.reset(names, usage))
        await self._steps(health_segment.reset(list(names), health))
        return usage_segment, health_segment

    async def _unchanged(self, previous: _Body, snap: Snapshot, plan: Plan) -> dict[str, int]:
        """Org set name -> its index in `previous`, for the org sets whose rendering under the new
        config would be byte for byte the old one: the same set (name, filters, labels), the same
        schedules and the very same results. Nothing, if something all org sets' lines show changed
        (the usage HELP text names each collector's interval; staleness depends on stale_after)."""
        old_config, config = previous.snapshot.config, snap.config
        if (old_config.poll.stale_after != config.poll.stale_after
                or any(old_config.collector(c.name).interval != config.collector(c.name).interval
                       for c in CATALOGUE)):
            return {}
        old_sets = {s.name: s for s in old_config.org_sets}
        old_owners = {owner: i for i, owner in enumerate(previous.plan.owners)}
        kept: dict[str, int] = {}
        for org_set in config.org_sets:
            await self._pause()  # ~30 us an org set: 30 ms at 1,000
            name = org_set.name
            index = old_owners.get(name)
            if index is None or old_sets.get(name) != org_set or previous.plan.of(name) != plan.of(name):
                continue
            old, new = previous.snapshot.of(name), snap.of(name)
            if len(old) == len(new) and all(new.get(slot) is result for slot, result in old.items()):
                kept[name] = index
        kept.pop(ENTERPRISE, None)  # its derived series (an org set's ACU limit) depend on every org set
        return kept


def _validity(chunks: Sequence[_Chunk]) -> tuple[float, float]:
    """When a body of these usage chunks starts and stops being valid: its staleness horizon."""
    return (max((c.valid_from for c in chunks), default=-math.inf),
            min((c.valid_until for c in chunks), default=math.inf))


def _gzip_whole(data: bytes) -> bytes:
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"".join([_GZIP_HEADER, compressor.compress(data), compressor.flush(),
                     struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)])


def _pieces(parts: Sequence[bytes]) -> Iterator[bytes]:
    """`parts` in order, the small ones joined into pieces of about PIECE_BYTES (a large one alone)."""
    group: list[bytes] = []
    size = 0
    for part in parts:
        if len(part) >= PIECE_BYTES:
            if group:
                yield b"".join(group)
                group, size = [], 0
            yield part
            continue
        group.append(part)
        size += len(part)
        if size >= PIECE_BYTES:
            yield b"".join(group)
            group, size = [], 0
    if group:
        yield b"".join(group)


def metrics_handler(exposition: Exposition) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """`/metrics`: text 0.0.4 or OpenMetrics by `Accept` (prometheus_client's negotiation), gzip
    when accepted; `?name[]=` filters go through prometheus_client's own (uncached) handler."""
    filtered = make_aiohttp_handler(exposition.registry)

    async def handler(request: web.Request) -> web.StreamResponse:
        if "name[]" in request.query:
            return await filtered(request)
        accept = ",".join(request.headers.getall(hdrs.ACCEPT, []))
        gzip = gzip_accepted(",".join(request.headers.getall(hdrs.ACCEPT_ENCODING, [])))
        parts, content_type = await exposition.render(accept, gzip=gzip)
        headers = {hdrs.CONTENT_TYPE: content_type}
        if gzip:
            headers[hdrs.CONTENT_ENCODING] = "gzip"
        if len(parts) == 1:  # at most STREAM_ABOVE bytes, joined once per body and tail (see _Body.response)
            return web.Response(body=parts[0], headers=headers)
        size = sum(map(len, parts))
        # Large cached parts go out a few at a time: joining them all would copy megabytes per scrape.
        response = web.StreamResponse(headers=headers)
        response.content_length = size
        await response.prepare(request)
        if request.method != "HEAD":
            for piece in _pieces(parts):
                await response.write(piece)
        await response.write_eof()
        return response

    return handler
