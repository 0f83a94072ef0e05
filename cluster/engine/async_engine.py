"""asyncio front of the engine: `generate()` yields a request's outputs as they are made.

The engine is synchronous and not thread-safe. One background thread owns the step loop
(torch releases the GIL in its kernels, so the event loop stays responsive); every engine
call goes through one lock, taken off the event loop so a long step never blocks it.
Outputs cross to the caller's loop with call_soon_threadsafe. Every stream ends: with its
final output, or with an exception when it is aborted, the engine fails or shuts down.
A caller that stops iterating (cancelled, client gone) aborts its request, which frees its
blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
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
_IDLE_WAIT_S = 0.005  # nothing schedulable (e.g. all waiting for KV): poll, don't spin


class RequestAborted(RuntimeError):
    """The request was aborted by someone other than its own stream."""


class RequestError(RuntimeError):
    """This request's own processing raised inside a step: it was stopped alone (its blocks
    freed), the engine goes on with the others."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_failure=None):
        """`on_failure(error)`: called on the loop thread when a step raises, before the
        waiters hear of it (a parallel instance's worker exits there)."""
        self.engine = engine
        self._on_failure = on_failure
        self._work = threading.Condition(threading.Lock())
        self._sinks: dict[str, _Sink] = {}
        self._error: BaseException | None = None
        self._stopped = False
        self._observer: Callable[[], Any] | None = None
        self.observed: Any = None  # the observer's latest result (observe)
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def observe(self, fn: Callable[[], Any]) -> None:
        """Run fn() under the engine lock now and after every change (each call, each step);
        its latest result is `observed`, read from any thread without waiting for a step.
        Work only enters the engine through a call and only leaves it through a step, so
        `observed` never shows an engine idler than it is (a worker's load report: a long
        step must not look like a hang to the router's poll)."""
        with self._work:
            self._observer = fn
            self.observed = fn()

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
        await self.compile_grammar(params)

        def start() -> None:
            self.engine.add_request(request_id, prompt, params, **kwargs)

        async for out in self.follow(request_id, start):
            yield out

    async def compile_grammar(self, params: SamplingParams | None) -> None:
        """Compile the grammar of `params` (structured outputs) on a thread, without the
        engine lock, so that add_request finds it cached and no step waits for a compile.
        ValueError if it is invalid."""
        if params is not None and params.structured_outputs is not None:
            await asyncio.to_thread(self.engine.compile_grammar, params)

    async def follow(
        self, request_id: str, start: Callable[[], RequestOutput | None]
    ) -> AsyncIterator[RequestOutput]:
        """Run start() under the engine lock (it puts request_id into the engine, e.g.
        add_request or commit_remote, and may return its first output), then stream the
        request's outputs. A caller that stops iterating aborts the request."""
        sink = (asyncio.get_running_loop(), asyncio.Queue())
        if not self.try_call(self._start, request_id, start, sink)[0]:  # the loop is stepping
            await asyncio.to_thread(self.call, self._start, request_id, start, sink)
        queue = sink[1]
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # nothing more will come
                    raise item
                # A consumer slower than the engine gets what piled up as one output (as
                # vLLM's output collector does), not a backlog of one-token items.
                while not item.finished and not queue.empty():
                    more = queue.get_nowait()
                    if isinstance(more, BaseException):
                        queue.put_nowait(more)  # raised on the next round
                        break
                    item = _merge(item, more)
                finished = item.finished
                yield item
        finally:
            if not finished:
                with contextlib.suppress(RuntimeError):  # engine already down: nothing to free
                    self.abort(request_id)

    def _start(self, request_id: str, start: Callable[[], RequestOutput | None], sink) -> None:
        first = start()
        self._sinks[request_id] = sink
        if first is not None:
            self._send(request_id, first)

    def abort(self, request_id: str) -> bool:
        """Abort a request; its stream, if any, ends with RequestAborted."""

        def _abort() -> bool:
            self._send(request_id, RequestAborted(f"request {request_id!r} was aborted"))
            return self.engine.abort(request_id)

        return self.call(_abort)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) under the engine lock and wake the loop (it may have new work)."""
        with self._work:
            return self._locked(fn, *args)

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._error is not None:
            raise RuntimeError("engine loop died") from self._error
        if self._stopped:
            raise RuntimeError("engine is shut down")
        result = fn(*args)
        if self._observer is not None:
            self.observed = self._observer()
        self._work.notify()
        return result

    def try_call(self, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """(True, call(fn, *args)) if the lock is free right now (the loop is idle);
        (False, None) at once if not, without waiting: event-loop code then goes through a
        thread instead."""
        if not self._work.acquire(blocking=False):
            return False, None
        try:
            return True, self._locked(fn, *args)
        finally:
            self._work.release()

    async def acall(self, fn: Callable[..., Any], *args: Any) -> Any:
        """call() from the event loop: at once when the engine is idle, else on a thread,
        so that the event loop never waits for a step."""
        done, result = self.try_call(fn, *args)
        return result if done else await asyncio.to_thread(self.call, fn, *args)

    def shutdown(self) -> None:
        """Stop the loop; every open stream ends with an error, new calls are refused."""
        with self._work:
            self._stopped = True
            self._work.notify()
        self._thread.join(timeout=10)
        with self._work:
            self._fail_all(RuntimeError("engine shut down"))

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._stopped and not self.engine.has_unfinished():
                    self._work.wait()
                if self._stopped:
                    return
                try:
                    for out in self.engine.step():
                        self._send(out.request_id, out)
                    for request_id, error in self.engine.take_failed():
                        self._send(
                            request_id, RequestError(f"request failed in the engine: {error}")
                        )
                except BaseException as e:  # noqa: BLE001 - every waiter must hear of it
                    if self._on_failure is not None:
                        self._on_failure(e)
                    self._error = e
                    self._fail_all(RuntimeError(f"engine failed: {e}"))
                    return
                if self._observer is not None:
                    self.observed = self._observer()
                if self.engine.last_step_num_tokens == 0:
                    self._work.wait(_IDLE_WAIT_S)  # woken early by new work
                    continue
            time.sleep(0)  # let callers waiting on the lock in before the next step

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> None:
        """Hand an item to the request's stream; a stream whose loop is gone is aborted."""
        final = isinstance(item, BaseException) or item.finished
        sink = self._sinks.pop(request_id, None) if final else self._sinks.get(request_id)
        if sink is None:
            return
        loop, queue = sink
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self._sinks.pop(request_id, None)
            self.engine.abort(request_id)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._sinks):
            self._send(request_id, error)


def _merge(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One output standing for two consecutive ones of a request."""
    newer.new_token_ids = older.new_token_ids + newer.new_token_ids
    newer.delta_text = older.delta_text + newer.delta_text
    if newer.prompt_logprobs is None:  # only the first output has them
        newer.prompt_logprobs = older.prompt_logprobs
    return newer
