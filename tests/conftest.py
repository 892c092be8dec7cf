"""Fixtures shared by the test modules of the collectors of SPEC §9 to §11."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from v3_support import Rigs


@pytest.fixture
async def rigs() -> AsyncIterator[Rigs]:
    """Simulator + exporter rigs, all stopped at the end of the test."""
    async with Rigs() as started:
        yield started
