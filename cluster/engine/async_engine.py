"""asyncio front of the engine: `generate()` yields a request's outputs as they are made.

The engine is synchronous and not thread-safe. One background thread owns the step loop
(torch releases the GIL in its kernels, so the event loop stays responsive); every engine
call goes through one lock. Outputs cross to the caller's loop with call_soon_threadsafe.
A caller that stops iterating (cancelled, client gone) aborts its request, which frees its
blocks.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine, Prompt
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams

_Sink = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._sinks: dict[str, _Sink] = {}
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig | None = None) -> AsyncLLMEngine:
        return cls(LLMEngine(config))

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; the last has finished=True. ValueError for bad input."""
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self.call(
            self._add, request_id, prompt, params, (asyncio.get_running_loop(), queue), kwargs
        )
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def _add(self, request_id, prompt, params, sink: _Sink, kwargs) -> None:
        self.engine.add_request(request_id, prompt, params, **kwargs)
        self._sinks[request_id] = sink

    def abort(self, request_id: str) -> bool:
        def _abort() -> bool:
            self._sinks.pop(request_id, None)
            return self.engine.abort(request_id)

        return self.call(_abort)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) under the engine lock and wake the loop (it may have new work)."""
        with self._work:
            if self._error is not None:
                raise RuntimeError("engine loop died") from self._error
            result = fn(*args)
            self._work.notify()
            return result

    def shutdown(self) -> None:
        with self._work:
            self._stopped = True
            self._work.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._stopped and not self.engine.has_unfinished():
                    self._work.wait()
                if self._stopped:
                    return
                try:
                    outputs = self.engine.step()
                except BaseException as e:  # noqa: BLE001 - every waiter must hear of it
                    self._fail_all(e)
                    return
                for out in outputs:
                    self._deliver(out)
            time.sleep(0)  # let callers waiting on the lock in before the next step

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if out.finished:
            self._sinks.pop(out.request_id, None)
        if sink is not None:
            loop, queue = sink
            loop.call_soon_threadsafe(queue.put_nowait, out)

    def _fail_all(self, error: BaseException) -> None:
        self._error = error
        for loop, queue in self._sinks.values():
            loop.call_soon_threadsafe(queue.put_nowait, RuntimeError(f"engine failed: {error}"))
        self._sinks.clear()
