"""Open-loop load generator for `cluster bench serve`: requests leave on their arrival times
(Poisson, Gamma or a trace's own), whatever the server is doing, over our gRPC API or the
OpenAI HTTP API, and each one's timings are recorded as the client sees them.

    arrival ─ send ─────────── first token ── token ── token ─ … ─ last token
              │◀──── TTFT ────▶│◀── ITL ──▶│                      │
              │◀──────────────────────── E2E ──────────────────────▶│
              TPOT = (E2E − TTFT) / (output tokens − 1)

Prompts are random token ids of the workload's lengths (no prefix-cache hits), sent with
ignore_eos so that every request produces exactly its output length, as `vllm bench serve`
does. The server's own TTFT breakdown (queue, prefill, transfer, first decode) comes back on
the last streamed message.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np


class BenchError(RuntimeError):
    """The target cannot be benchmarked (down, refusing, wrong address); says what to do."""


@dataclass(slots=True)
class RequestRecord:
    input_len: int
    output_len: int  # asked for
    scheduled_s: float = 0.0  # arrival offset from the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    error: str = ""
    breakdown_s: dict[str, float] | None = None  # the server's queue/prefill/transfer/...
    # Over gRPC: the answer's token ids (a multi-turn session resends them) and what the
    # server says about the prompt's KV; None where it does not report a figure.
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int | None = None  # prompt tokens the instance that ran it had cached
    kv_hit_tokens: int | None = None  # prompt tokens the decode instance had: not pulled
    kv_bytes: int | None = None  # KV bytes the decode instance pulled for this request
    local_prefill: bool | None = None  # the prompt ran on the decode instance itself
    session_id: str = ""  # multi-turn runs (multiturn.py): the conversation and its turn
    turn: int = 0
    send_delay_s: float = 0.0  # fixed-timing replay: sent this late, its previous turn unfinished

    @property
    def ok(self) -> bool:
        return not self.error and self.ttft_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


@dataclass(slots=True, frozen=True)
class RequestPlan:
    """One request to send: its prompt ids, output length and arrival offset."""

    prompt_ids: list[int]
    output_len: int
    arrival_s: float


def build_requests(
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    arrivals_s: np.ndarray,
    vocab_size: int,
    max_model_len: int,
    seed: int = 0,
) -> list[RequestPlan]:
    """Random prompts of the given lengths, clipped so prompt + output fits the context."""
    rng = np.random.default_rng(seed)
    plans = []
    for n_in, n_out, t in zip(input_lens, output_lens, arrivals_s, strict=True):
        n_out = int(min(max(1, n_out), max_model_len - 1))
        n_in = int(min(max(1, n_in), max_model_len - n_out))
        ids = rng.integers(3, vocab_size, n_in).tolist()  # skip bos/eos/pad at the bottom
        plans.append(RequestPlan(ids, n_out, float(t)))
    return plans


# --- backends --------------------------------------------------------------------------------


class GrpcBackend:
    """Our PDCluster.Generate stream."""

    name = "grpc"

    def __init__(self, target: str, api_key: str | None = None, timeout_s: float = 600.0):
        self.target, self.timeout_s = target, timeout_s
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._channel = None

    async def __aenter__(self) -> GrpcBackend:
        import grpc

        from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc

        self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = pdcluster_pb2_grpc.PDClusterStub(self._channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()

    async def model_info(self) -> dict:
        import grpc

        from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb

        try:
            info = await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=5, metadata=self.metadata
            )
            status = await self._stub.GetClusterStatus(
                pb.GetClusterStatusRequest(), timeout=5, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as e:
            raise BenchError(
                f"cannot use the cluster at {self.target} over gRPC: {e.code().name}: "
                f"{e.details()} (is `cluster serve` running there? right --api-key?)"
            ) from None
        return {
            "model_id": info.name,
            "vocab_size": info.vocab_size,
            "max_model_len": info.max_model_len,
            "mode": status.mode,
            "instances": [(i.role, i.healthy) for pool in status.pools for i in pool.instances],
        }

    async def send(self, plan: RequestPlan, record: RequestRecord) -> None:
        import grpc

        from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb

        request = pb.GenerateRequest(
            request_id=f"bench-{uuid.uuid4().hex[:12]}",
            token_ids=pb.TokenIds(ids=plan.prompt_ids),
            sampling_params=pb.SamplingParams(
                max_tokens=plan.output_len, temperature=0.0, ignore_eos=True
            ),
        )
        start = last = time.perf_counter()
        try:
            stream = self._stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
            async for response in stream:
                now = time.perf_counter()
                if response.token_ids:
                    _token(record, start, last, now, len(response.token_ids))
                    record.output_ids.extend(response.token_ids)
                    last = now
                if response.HasField("usage"):
                    record.cached_tokens = response.usage.cached_tokens
                if response.HasField("timing"):
                    _timing(record, response.timing)
        except grpc.aio.AioRpcError as e:
            record.error = f"{e.code().name}: {e.details()}"
        record.e2e_s = time.perf_counter() - start


def _timing(record: RequestRecord, t) -> None:
    record.breakdown_s = {
        "queue": t.queue_s,
        "prefill": t.prefill_s,
        "transfer": t.transfer_s,
        "first_decode": t.first_decode_s,
    }
    record.kv_bytes = t.kv_bytes
    hit, local = _reported(t, "kv_hit_tokens"), _reported(t, "local_prefill")
    record.kv_hit_tokens = None if hit is None else int(hit)
    record.local_prefill = None if local is None else bool(local)


def _reported(message, name: str):
    """A field of the response, or None when this build's API has no such field (the
    KV-aware routing fields arrived after kv_bytes)."""
    return getattr(message, name) if name in message.DESCRIPTOR.fields_by_name else None


class OpenAIBackend:
    """The OpenAI HTTP API (/v1/completions, streamed), ours or any compatible server."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        model: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s, self.model = timeout_s, model

    async def __aenter__(self) -> OpenAIBackend:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue in the client
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=self.headers
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def model_info(self) -> dict:
        import aiohttp

        try:
            async with self._session.get(f"{self.base_url}/models", timeout=5) as resp:
                if resp.status != 200:
                    raise BenchError(
                        f"GET {self.base_url}/models answered HTTP {resp.status}: "
                        f"{(await resp.text())[:200]}"
                    )
                models = (await resp.json())["data"]
        except (TimeoutError, aiohttp.ClientError) as e:
            raise BenchError(
                f"cannot reach {self.base_url}: {e!r} (is `cluster serve` running there?)"
            ) from None
        if not models:
            raise BenchError(f"{self.base_url}/models lists no model")
        entry = models[0]
        self.model = self.model or entry["id"]
        return {
            "model_id": self.model,
            "vocab_size": entry.get("vocab_size"),
            "max_model_len": entry.get("max_model_len"),
            "instances": [],
        }

    async def send(self, plan: RequestPlan, record: RequestRecord) -> None:
        import aiohttp

        body = {
            "model": self.model,
            "prompt": plan.prompt_ids,
            "max_tokens": plan.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = last = time.perf_counter()
        try:
            async with self._session.post(f"{self.base_url}/completions", json=body) as resp:
                if resp.status != 200:
                    record.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    return
                async for line in resp.content:
                    now = time.perf_counter()
                    last = self._event(line, record, start, last, now)
        except (TimeoutError, aiohttp.ClientError) as e:
            record.error = f"{type(e).__name__}: {e}"
        finally:
            record.e2e_s = time.perf_counter() - start

    def _event(self, line: bytes, record: RequestRecord, start: float, last: float, now: float):
        text = line.decode().strip()
        if not text.startswith("data:") or text == "data: [DONE]":
            return last
        event = json.loads(text[5:])
        if "error" in event:
            record.error = str(event["error"].get("message", event["error"]))
            return last
        choices = event.get("choices") or []
        if choices and choices[0].get("text") is not None and choices[0].get("text") != "":
            _token(record, start, last, now, 1)
            return now
        timing = event.get("timing")
        if timing:
            record.breakdown_s = {
                k: timing[f"{k}_s"] for k in ("queue", "prefill", "transfer", "first_decode")
            }
        usage = event.get("usage")
        if usage and not choices:
            record.num_output_tokens = usage.get("completion_tokens", record.num_output_tokens)
        return last


def _token(record: RequestRecord, start: float, last: float, now: float, count: int) -> None:
    if record.ttft_s is None:
        record.ttft_s = now - start
    else:
        record.itls_s.append(now - last)
    record.num_output_tokens += count


# --- the open loop -----------------------------------------------------------------------------


async def run_open_loop(
    backend, plans: list[RequestPlan], max_duration_s: float, progress: bool = True
) -> tuple[list[RequestRecord], float]:
    """Send every request at its arrival time (stop sending after max_duration_s); wait for
    all to finish (a request still running at 2 x max_duration_s is cancelled and counted as
    an error). Returns the records and the run's duration."""
    records = [RequestRecord(len(p.prompt_ids), p.output_len, p.arrival_s) for p in plans]
    bar = _Progress(len(plans), progress)
    start = time.perf_counter()
    tasks = []
    for plan, record in zip(plans, records, strict=True):
        delay = start + plan.arrival_s - time.perf_counter()
        if plan.arrival_s > max_duration_s:
            break
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(backend.send(plan, record))
        task.add_done_callback(lambda _: bar.update())
        tasks.append(task)
    remaining = 2 * max_duration_s - (time.perf_counter() - start)
    done, pending = await asyncio.wait(tasks, timeout=max(remaining, 1.0)) if tasks else ((), ())
    for task in pending:
        task.cancel()
    for record, task in zip(records, tasks, strict=False):
        if task in pending:
            record.error = record.error or "cancelled: still running at 2 x the run's time cap"
    duration = time.perf_counter() - start
    bar.close()
    return records[: len(tasks)], duration


class _Progress:
    """tqdm on stderr when it is installed and asked for, else nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="req", leave=False, file=sys.stderr)
            except ImportError:
                self.bar = None

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
