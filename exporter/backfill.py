"""`devin-usage-exporter backfill`: what the exporter would have published over a past range, as OpenMetrics (SPEC §12).

Every step end in (start, end] is a moment a live poll could have happened: for each one, each org
set (configured and discovered) and each schedule of a per-window collector, the backfill asks the
API exactly what that poll would have asked (poller.points_at, through the same Transport) and
writes the points as the same series (collector.series_labels), stamped with the step end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TextIO

from exporter.catalogue import CATALOGUE, COLLECTORS
from exporter.catalogue.declare import Point, Query
from exporter.catalogue.declare import format_unix_rfc3339 as _iso  # in messages naming a moment
from exporter.catalogue.organizations import organizations
from exporter.clocks import Clocks
from exporter.collector import extra_family, family_help, series_labels
from exporter.config import (
    WINDOWED_COLLECTORS,
    Config,
    ConfigError,
    OrgSet,
    Window,
    load_config,
    parse_duration,
    parse_window,
)
from exporter.cycle import BillingCycle
from exporter.discovery import discovered_sets
from exporter.logs import LOG_LEVELS, setup_logging
from exporter.openmetrics import Spool
from exporter.plan import ScheduleKey, build_plan
from exporter.poller import POLLS_PER_REQUEST_SLOT, points_at
from exporter.progress import Progress, duration
from exporter.snapshot import ENTERPRISE
from exporter.transport import ApiError, Attempt, Transport, new_session

log = logging.getLogger(__name__)

PROG: Final = "devin-usage-exporter backfill"
DAY: Final = 86400
MIN_STEP: Final = 60.0
# The default --windows: those a week-over-week comparison and the dashboards need; longer ones
# cost as much per step and are rarely graphed back in time.
DEFAULT_MAX_WINDOW: Final = 7 * DAY
LOOKBACK: Final = 300  # Prometheus' default --query.lookback-delta
REPORTED_FAILURES: Final = 5  # left-out points told one by one; the rest only counted
EXIT_INTERRUPTED: Final = 130  # as a shell reports a process ended by SIGINT


class BackfillError(Exception):
    """A bad flag or a range that cannot be backfilled: one line, exit 2."""


# --- flags -------------------------------------------------------------------------------------


def parse_date(text: str, flag: str) -> datetime:
    """`2026-11-01` (midnight UTC) or an RFC 3339 time (`2026-11-01T06:00:00Z`, an offset, or none: UTC)."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BackfillError(f"{flag} {text!r} is not a date like 2026-11-01 or 2026-11-01T06:00:00Z") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_step(text: str) -> float:
    """--step: at least 1m, and either a divisor of a day or whole days, so step ends fall at the same
    times of every (UTC) day and a week-over-week comparison finds the samples it compares."""
    try:
        step = parse_duration(text)
    except ValueError as exc:
        raise BackfillError(f"--step: {exc}") from None
    if step < MIN_STEP:
        raise BackfillError(f"--step {text} is shorter than the minimum of 1m")
    if step != int(step) or (DAY % step and step % DAY):
        raise BackfillError(f"--step {text}: a step must divide a day (1m, 5m, 15m, 1h, 6h, ...) or be whole "
                            "days (1d, 7d), so that step ends fall at the same times every day")
    return step


def step_ends(start: datetime, end: datetime, step: float, now: float) -> range:
    """Every step end in (start, end], in Unix seconds: the multiples of `step` since the Unix epoch
    (UTC midnight for 1d). start and end must be step ends themselves, so nothing is rounded silently."""
    first, last = start.timestamp(), end.timestamp()
    if first >= last:
        raise BackfillError(f"--start {_iso(first)} is not before --end {_iso(last)}")
    for flag, at in (("--start", first), ("--end", last)):
        if at % step:
            below = at - at % step
            raise BackfillError(
                f"{flag} {_iso(at)} is not a step end of --step {_step_text(step)} (step ends are multiples of "
                f"the step from 1970-01-01T00:00:00Z): use {_iso(below)} or {_iso(below + step)}")
    if last > now:
        raise BackfillError(f"--end {_iso(last)} is in the future: the API has nothing to say about it yet")
    return range(int(first + step), int(last) + 1, int(step))


def _step_text(step: float) -> str:
    for unit, size in (("d", DAY), ("h", 3600), ("m", 60)):
        if step % size == 0:
            return f"{int(step // size)}{unit}"
    return f"{step:g}s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write what the exporter would have published over a past range, as OpenMetrics with "
        "timestamps, for `promtool tsdb create-blocks-from openmetrics`.")
    parser.add_argument("--config", metavar="FILE",
                        default=os.environ.get("DEVIN_EXPORTER_CONFIG", "config.yaml"),
                        help="YAML config (default: $DEVIN_EXPORTER_CONFIG, else config.yaml)")
    parser.add_argument("--start", metavar="DATE", required=True,
                        help="start of the range, exclusive: 2026-11-01 (UTC) or 2026-11-01T06:00:00Z")
    parser.add_argument("--end", metavar="DATE", required=True, help="end of the range, inclusive")
    parser.add_argument("--step", default="1d",
                        help="time between samples, 1m or more, a divisor of a day or whole days (default 1d)")
    parser.add_argument("--windows", metavar="LIST",
                        help="comma-separated windows for every per-window collector, e.g. 24h,7d "
                        "(default: each collector's configured windows of at most 7 days)")
    parser.add_argument("--output", metavar="FILE", default="-",
                        help="where to write the OpenMetrics text; - for stdout (default), written at the end")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning")
    return parser


@dataclass(frozen=True)
class Request:
    """The backfill one command line asks for."""

    config: Config
    steps: range
    windows: tuple[Window, ...] | None  # --windows; None: the configured ones of at most 7 days
    output: Path | None  # None: stdout


def resolve(args: argparse.Namespace, now: float) -> Request:
    """The flags checked against each other and the config; BackfillError or ConfigError on a bad one."""
    start, end = parse_date(args.start, "--start"), parse_date(args.end, "--end")
    steps = step_ends(start, end, parse_step(args.step), now)
    config = load_config(args.config).with_shard(None)  # a backfill writes every org set's history
    windows: tuple[Window, ...] | None = None
    if args.windows is not None:
        names = [n.strip() for n in args.windows.split(",") if n.strip()]
        if not names:
            raise BackfillError("--windows: list at least one window, e.g. 24h,7d")
        try:
            windows = tuple(dict.fromkeys(parse_window(n, steps.step) for n in names))
        except ValueError as exc:
            raise BackfillError(f"--windows: {exc}") from None
    output: Path | None = None
    if args.output != "-":
        output = Path(args.output)
        if not output.parent.is_dir():
            raise BackfillError(f"--output {args.output}: directory {output.parent} does not exist")
        if not os.access(output.parent, os.W_OK):
            raise BackfillError(f"--output {args.output}: directory {output.parent} is not writable")
    request = Request(config, steps, windows, output)
    check_windows(request)
    return request


# --- what to ask -------------------------------------------------------------------------------


def with_windows(config: Config, windows: tuple[Window, ...] | None) -> Config:
    """The config whose per-window collectors poll `windows` for every org set (None: as configured)."""
    if windows is None:
        return config
    collectors = {name: dataclasses.replace(settings, windows=windows) if name in WINDOWED_COLLECTORS else settings
                  for name, settings in config.collectors.items()}
    return dataclasses.replace(config, collectors=collectors)


def short(window: Window) -> bool:
    """A window of at most 7 days: the default set to backfill."""
    if window.kind == "range":
        return window.range_seconds is not None and window.range_seconds <= DEFAULT_MAX_WINDOW
    return window.kind == "today"


def schedules(config: Config, windows: tuple[Window, ...] | None) -> tuple[ScheduleKey, ...]:
    """The schedules of every org set's per-window collectors that a backfill asks at each step end.

    Enterprise-level collectors (organizations, queue) are not backfilled: their endpoints answer
    only the present (the organizations as they are now, today's queue)."""
    keys = build_plan(with_windows(config, windows)).keys
    return tuple(k for k in keys if k.org_set != ENTERPRISE and k.window is not None
                 and (windows is not None or short(k.window)))


def check_windows(request: Request) -> None:
    """A window some enabled collector cannot take over past moments is a flag error."""
    config = request.config
    version = config.api.version
    for collector in CATALOGUE:
        settings = config.collector(collector.name)
        if collector.name not in WINDOWED_COLLECTORS or not settings.enabled or version not in collector.calls:
            continue
        # The default windows (at most 7 days) never hold billing_cycle.
        for window in request.windows or ():
            if window.kind == "billing_cycle" and version not in collector.cycle_bounds:
                # v2 usage sends no dates for it and the API answers the current cycle: never a past one.
                raise BackfillError(
                    f"--windows billing_cycle: collector {collector.name} on API {version} sends no dates for it "
                    "(the API then answers the current cycle), so it has no history; leave it out")
    if not schedules(config, request.windows) and not config.discovery.organizations:
        raise BackfillError("no per-window collector has a window of at most 7 days to backfill; "
                            "name the windows with --windows, e.g. --windows 24h,7d")


def requests_per_point(key: ScheduleKey) -> int:
    """The GETs one poll of the schedule makes (the per-organization and per-user calls counted)."""
    collector = COLLECTORS[key.collector]
    query = Query(key.org_ids, key.user_ids)
    return sum(len(endpoint.requests(query, org_set=None, collector=key.collector, permission=None))
               for endpoint in collector.plan(key.version, key))


async def first_with_data(steps: Sequence[int], has_data: Callable[[int], Awaitable[bool]]) -> int:
    """The index of the first step end the API has data for (len(steps): none). Once an enterprise's
    data begins it goes on to now, so a binary search asks about log2(steps) moments, not every one."""
    if await has_data(steps[0]):
        return 0
    low, high = 0, len(steps)  # steps[low] has none; the answer is in (low, high]
    while high - low > 1:
        middle = (low + high) // 2
        if await has_data(steps[middle]):
            high = middle
        else:
            low = middle
    return high


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a run did, for the summary and the exit code."""

    points: int = 0
    left_out: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    skipped: int = 0  # step ends before the upstream's data, times schedules

    def observe(self, attempt: Attempt) -> None:
        self.requests += 1


async def backfill(request: Request, stderr: TextIO, stdout: TextIO, *, clocks: Clocks | None = None,
                   terminal: bool | None = None) -> int:
    """Run the backfill of `request`; 0 when every point was written, 1 when some were left out."""
    clocks = clocks or Clocks()
    config = request.config
    outcome = Outcome()
    session = new_session()
    transport = Transport(session, config.api, monotonic=clocks.monotonic, wall_clock=clocks.wall,
                          sleep=clocks.sleep, random=clocks.random, observer=outcome.observe)
    cycle = BillingCycle(transport, clocks.wall)
    try:
        if config.discovery.organizations:
            try:
                config = await _discover(config, transport, cycle, clocks.wall())
            except ApiError as exc:
                stderr.write(f"{PROG}: cannot list the organizations for discovery: {exc}\n")
                return 1
        keys = schedules(config, request.windows)
        steps = request.steps
        first = await _data_start(config, steps, cycle, stderr)
        outcome.skipped = first * len(keys)
        steps = steps[first:]
        total = len(steps) * len(keys)
        calls = sum(requests_per_point(k) for k in keys) * len(steps)
        rps = config.api.max_requests_per_second
        stderr.write(f"{PROG}: {len(steps)} step end(s) x {len(keys)} schedule(s) of {len(config.org_sets)} org "
                     f"set(s) = {total} point(s), {calls} request(s): at least {duration(calls / rps)} at "
                     f"api.max_requests_per_second {rps:g}\n")
        if steps.step > LOOKBACK:
            stderr.write(f"{PROG}: note: PromQL finds a sample only up to 5m after its time, so rules and alerts "
                         f"evaluated between step ends see nothing of a --step {_step_text(steps.step)} history; "
                         "backfill the last week at --step 5m for week-over-week rules (see the README)\n")
        stderr.flush()
        parent = request.output.parent if request.output is not None else None
        with Spool(parent if parent is not None else Path(tempfile.gettempdir())) as spool:
            for collector in CATALOGUE:
                for family in collector.families:
                    spool.declare(family.name, family_help(config, collector.name, family))
            progress = Progress(total, stderr, terminal=terminal, clock=clocks.monotonic)
            try:
                sets = {s.name: s for s in config.org_sets}
                work = iter(keys)
                workers = max(1, config.api.max_concurrency)
                await asyncio.gather(*(_worker(work, sets, steps, transport, cycle, spool, progress, outcome)
                                       for _ in range(workers)))
            finally:
                progress.close()
            if request.output is not None:
                spool.write_file(request.output)
            else:
                stdout.flush()
                spool.write(stdout.buffer)
                stdout.buffer.flush()
            samples = spool.samples
    finally:
        await session.close()
    _summary(outcome, samples, request, config, progress.elapsed(), stderr)
    return 1 if outcome.left_out else 0


async def _discover(config: Config, transport: Transport, cycle: BillingCycle, now: float) -> Config:
    """The config with the org sets discovery makes of the organizations the API lists now."""
    key = next(k for k in build_plan(config).of(ENTERPRISE) if k.collector == "organizations")
    points = await points_at(transport, key, datetime.fromtimestamp(now, tz=UTC), cycle)
    cycle.learn(points)
    return config.with_org_sets(discovered_sets(config, organizations(points)))


async def _data_start(config: Config, steps: range, cycle: BillingCycle, stderr: TextIO) -> int:
    """How many leading step ends come before the enterprise's first billing cycle, where the API's
    data begins (they are skipped, and said so); 0 when that cannot be told."""
    version = config.api.version

    async def has_data(at: int) -> bool:
        return await cycle.cycle_at(version, at) is not None

    try:
        first = await first_with_data(steps, has_data)
    except ApiError as exc:
        stderr.write(f"{PROG}: note: cannot tell where the API's data begins (billing cycles: {exc}); "
                     "asking every step end\n")
        return 0
    if first:
        begins = await cycle.cycle_at(version, steps[first]) if first < len(steps) else None
        since = f"{_iso(begins[0])}, the enterprise's first billing cycle" if begins else "the range's end"
        stderr.write(f"{PROG}: note: --start {_iso(steps[0] - steps.step)} is before the API's data, which "
                     f"begins at {since}: {first} step end(s) before it are skipped\n")
    return first


async def _worker(work: Iterator[ScheduleKey], sets: dict[str, OrgSet], steps: range, transport: Transport,
                  cycle: BillingCycle, spool: Spool, progress: Progress, outcome: Outcome) -> None:
    """Backfill schedule after schedule: a few step ends at once, written in time order."""
    for key in work:  # one iterator shared by every worker: each schedule is taken once
        org_set = sets[key.org_set]
        group = spool.group()
        try:
            for batch in _batches(steps, POLLS_PER_REQUEST_SLOT):
                results = await asyncio.gather(*(_point(transport, key, at, cycle) for at in batch))
                for at, result in zip(batch, results, strict=True):
                    if isinstance(result, ApiError | str):
                        _left_out(key, at, result, progress, outcome)
                        continue
                    for point, labels in series_labels(org_set, key, result):
                        if point.family not in spool.families:
                            extra = extra_family(point.family)
                            if extra is None:
                                continue  # as the live collector: a name it would not publish
                            spool.declare(extra.name, extra.help)
                        group.add(point.family, labels, point.value, at)
                    outcome.points += 1
                    progress.advance()
        except BaseException:
            group.discard()
            raise
        group.close()


def _batches(steps: range, size: int) -> Iterator[range]:
    """`steps` in consecutive slices of `size` (itertools.batched is Python 3.12)."""
    for i in range(0, len(steps), size):
        yield steps[i:i + size]


async def _point(transport: Transport, key: ScheduleKey, at: int,
                 cycle: BillingCycle) -> tuple[Point, ...] | ApiError | str:
    """The points of one schedule at one step end, or why there are none."""
    try:
        return await points_at(transport, key, datetime.fromtimestamp(at, tz=UTC), cycle)
    except ApiError as exc:
        return exc
    except Exception as exc:  # a DeclarationError too: a bug, said loudly, the run goes on
        return f"internal error: {type(exc).__name__}: {exc}"


def _left_out(key: ScheduleKey, at: int, error: ApiError | str, progress: Progress, outcome: Outcome) -> None:
    reason = str(error.reason) if isinstance(error, ApiError) else "internal"
    outcome.left_out[reason] += 1
    progress.advance(left_out=True)
    if sum(outcome.left_out.values()) <= REPORTED_FAILURES:
        window = key.window.name if key.window is not None else "-"
        progress.note(f"{PROG}: left out: org set {key.org_set!r}, collector {key.collector}, window {window} "
                      f"at {_iso(at)}: {error}")


def _summary(outcome: Outcome, samples: int, request: Request, config: Config, elapsed: float,
             stderr: TextIO) -> None:
    where = str(request.output) if request.output is not None else "stdout"
    line = (f"{PROG}: wrote {samples} sample(s) of {outcome.points} point(s) for {len(config.org_sets)} org set(s) "
            f"to {where} in {duration(elapsed)} ({outcome.requests} request(s))")
    if outcome.skipped:
        line += f"; {outcome.skipped} point(s) before the API's data skipped"
    if outcome.left_out:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(outcome.left_out.items()))
        line += f"; {sum(outcome.left_out.values())} point(s) left out after retries ({reasons})"
    stderr.write(line + "\n")
    stderr.flush()


def main(argv: Sequence[str], *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """The subcommand: 0 every point written, 1 some left out, 2 bad config or flags, 130 interrupted."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = build_parser().parse_args(list(argv))  # a malformed flag: argparse prints usage, exits 2
    setup_logging(args.log_level, "logfmt", err)
    clocks = Clocks()
    try:
        request = resolve(args, clocks.wall())
    except BackfillError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return 2
    except ConfigError as exc:
        err.write(f"{PROG}: config error: {exc}\n")
        return 2
    except Exception as exc:  # an unreadable file, say: one line, never a traceback
        err.write(f"{PROG}: config error: {args.config}: cannot load: {type(exc).__name__}: {exc}\n")
        return 2
    if request.output is None and out.isatty():
        err.write(f"{PROG}: error: not writing OpenMetrics to a terminal; give --output FILE, or redirect stdout\n")
        return 2
    try:
        return asyncio.run(_interruptible(backfill(request, err, out, clocks=clocks)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.write(f"\n{PROG}: interrupted; no output written\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `backfill ... | head`: the reader left; say so once, not with a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # the interpreter's final flush must not fail too
        err.write(f"{PROG}: stdout was closed before the output was written\n")
        return 1


async def _interruptible(run: Awaitable[int]) -> int:
    """`run`, cancelled by SIGINT or SIGTERM so that the spool is removed and no output is renamed into place."""
    task = asyncio.ensure_future(run)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await task
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
