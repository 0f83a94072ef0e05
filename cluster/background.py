"""Tasks nobody awaits (cleanups, aborts, health watchers): asyncio keeps only a weak
reference to a task, so one that is merely created may be collected mid-flight. `spawn`
holds each until it is done."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_TASKS: set[asyncio.Task] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
    """Run `coro` on the running loop, held until it ends; returns its task."""
    task = asyncio.ensure_future(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return task
