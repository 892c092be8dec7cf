"""Every source of time and chance the exporter uses, bundled so tests inject them and never sleep."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Clocks:
    wall: Callable[[], float] = time.time  # unix time: windows, timestamps, staleness
    monotonic: Callable[[], float] = time.monotonic  # schedules, pauses, rate limits
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    random: Callable[[], float] = random.random  # jitter and backoff
