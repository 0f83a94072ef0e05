"""The data plane: typed messages (protocol.py) over persistent ZeroMQ connections.

    caller (router, decode worker)                  worker
    Peer: DEALER ─── tcp, one connection ───▶ Server: ROUTER, bound to a free port
      call(msg)   [id, "c", msg]  ─────────▶  handler(msg)       ─▶ [id, "r", reply]
      stream(msg) [id, "s", msg]  ─────────▶  async generator    ═▶ [id, "i", item] ... [id, "e"]
      (closed early)   [id, "k"]  ─────────▶  cancel its task (the generator's finally runs)
      any failure                       ◀──── [id, "x", Error(kind, message)]

pyzmq + msgspec, as vLLM and mini-sglang move requests and tokens between processes: a
message costs tens of microseconds, against a millisecond and more for a Ray actor call.
Ray still owns the processes (placement, restart, the registry); this module only moves
messages between them.

A peer that dies is noticed at once: a ZeroMQ socket monitor reports the TCP disconnect, and
every call and stream waiting on that peer raises PeerLost. A peer that hangs (SIGSTOP, a
partition) misses ZMTP heartbeats and is disconnected within HEARTBEAT_TIMEOUT_S. A Peer
that lost its connection stays lost: the caller makes a new one (to the restarted
instance's new address).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from cluster.engine.async_engine import RequestAborted, RequestError
from cluster.kv_transfer.connector import (
    LeaseExpired,
    NoCapacity,
    PrefillUnavailable,
    RemoteTransferError,
    TransferError,
    TransferTimeout,
)
from cluster.kv_transfer.layout import LayoutMismatchError
from cluster.workers import protocol

logger = logging.getLogger(__name__)

HEARTBEAT_IVL_S = 1.0
HEARTBEAT_TIMEOUT_S = 3.0
_CALL, _STREAM, _CANCEL = b"c", b"s", b"k"
_REPLY, _ITEM, _END, _ERROR = b"r", b"i", b"e", b"x"

# Exceptions that mean something to the caller travel by class name and are raised again
# there; anything else arrives as RemoteError.
_KNOWN_ERRORS = {
    cls.__name__: cls
    for cls in (
        ValueError,
        TypeError,
        KeyError,
        RequestAborted,
        RequestError,
        TransferError,
        TransferTimeout,
        LeaseExpired,
        RemoteTransferError,
        PrefillUnavailable,
        NoCapacity,
        LayoutMismatchError,
    )  # fmt: skip
}


class PeerLost(ConnectionError):
    """The connection to a peer broke (the process died, or stopped answering heartbeats),
    or the peer was closed."""


class RemoteError(RuntimeError):
    """A peer's handler raised an exception this side has no class for."""


def _error(kind: str, message: str) -> BaseException:
    cls = _KNOWN_ERRORS.get(kind)
    if cls is None:
        return RemoteError(f"{kind}: {message}")
    return cls(message)


def _context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context.instance()


def _keepalive(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_IVL_S * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT_S * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TTL, int(HEARTBEAT_TIMEOUT_S * 1000))


# -- worker side ----------------------------------------------------------------------------

Handler = Callable[[Any], Awaitable[Any] | AsyncIterator[Any]]


class Server:
    """Answers protocol.Request messages on one ROUTER socket, each in its own task.
    `handlers`: message type -> async function (one reply) or async generator (a stream)."""

    def __init__(self, handlers: dict[type, Handler], host: str = "127.0.0.1"):
        self.handlers = handlers
        self._decoder = msgspec.msgpack.Decoder(protocol.Request)
        self._encoder = msgspec.msgpack.Encoder()
        self._sock = _context().socket(zmq.ROUTER)
        _keepalive(self._sock)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone caller raises, never drops
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._tasks: dict[tuple[bytes, bytes], asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        """Serve on the running event loop (the worker's)."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) < 3:
                continue
            peer, call_id, kind = frames[0], frames[1], frames[2]
            key = (peer, call_id)
            if kind == _CANCEL:
                task = self._tasks.get(key)
                if task is not None:
                    task.cancel()
                continue
            try:
                msg = self._decoder.decode(frames[3])
            except (msgspec.DecodeError, msgspec.ValidationError, IndexError) as e:
                await self._send(peer, call_id, _ERROR, self._encoder.encode(
                    protocol.Error("ValueError", f"bad message: {e}")))  # fmt: skip
                continue
            run = self._stream if kind == _STREAM else self._call
            task = asyncio.ensure_future(run(peer, call_id, msg))
            self._tasks[key] = task
            task.add_done_callback(lambda _, key=key: self._tasks.pop(key, None))

    async def _call(self, peer: bytes, call_id: bytes, msg) -> None:
        try:
            reply = await self.handlers[type(msg)](msg)
            payload = self._encoder.encode(reply)
        except asyncio.CancelledError:
            return
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
            await self._send_error(peer, call_id, e)
            return
        await self._send(peer, call_id, _REPLY, payload)

    async def _stream(self, peer: bytes, call_id: bytes, msg) -> None:
        gen = None
        try:
            gen = self.handlers[type(msg)](msg)
            async for item in gen:
                if not await self._send(peer, call_id, _ITEM, self._encoder.encode(item)):
                    return  # the caller is gone: stop (aclose below aborts the request)
            await self._send(peer, call_id, _END, b"")
        except asyncio.CancelledError:
            return
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
            await self._send_error(peer, call_id, e)
        finally:
            if gen is not None:
                with contextlib.suppress(BaseException):
                    await gen.aclose()

    async def _send_error(self, peer: bytes, call_id: bytes, error: BaseException) -> None:
        if not isinstance(error, tuple(_KNOWN_ERRORS.values())):
            logger.exception("data-plane handler failed", exc_info=error)
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        payload = self._encoder.encode(protocol.Error(type(error).__name__, str(message)))
        await self._send(peer, call_id, _ERROR, payload)

    async def _send(self, peer: bytes, call_id: bytes, kind: bytes, payload: bytes) -> bool:
        try:
            await self._sock.send_multipart((peer, call_id, kind, payload))
            return True
        except zmq.ZMQError:  # EHOSTUNREACH: that caller disconnected
            for key, task in list(self._tasks.items()):
                if key[0] == peer and key[1] != call_id:
                    task.cancel()
            return False

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self._tasks.values()):
            task.cancel()
        self._sock.close(linger=0)


# -- caller side ----------------------------------------------------------------------------


class Peer:
    """One persistent connection to a Server: concurrent calls and streams, by call id.
    `on_lost(error)` is called once when the connection is lost (the caller's failure
    detection: the router marks that instance lost at once)."""

    def __init__(self, address: str, on_lost: Callable[[PeerLost], None] | None = None):
        self.address = address
        self.on_lost = on_lost
        self.lost: PeerLost | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders: dict[Any, msgspec.msgpack.Decoder] = {}
        self._ids = itertools.count(1)
        self._waiting: dict[bytes, asyncio.Future | asyncio.Queue] = {}
        self._sock = _context().socket(zmq.DEALER)
        _keepalive(self._sock)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED | zmq.EVENT_CLOSED
            | zmq.EVENT_CONNECT_RETRIED
        )  # fmt: skip
        self._sock.connect(address)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._receive()), loop.create_task(self._watch())]

    async def call(self, msg, reply_type: Any = Any, timeout: float | None = None):
        """Send `msg`; its reply, decoded as `reply_type`. Raises the handler's exception,
        PeerLost, or TimeoutError (the call is cancelled there)."""
        self._check()
        call_id = self._next_id()
        future = self._waiting[call_id] = asyncio.get_running_loop().create_future()
        try:
            await self._sock.send_multipart((call_id, _CALL, self._encoder.encode(msg)))
            async with asyncio.timeout(timeout):
                payload = await future
            return self._decoder(reply_type).decode(payload)
        except BaseException:
            if not future.done():  # timed out or cancelled: stop it there
                self._cancel(call_id)
            raise
        finally:
            self._waiting.pop(call_id, None)

    async def stream(self, msg, item_type: Any = Any) -> AsyncIterator[Any]:
        """Send `msg`; yield its stream's items. Closing the generator early cancels the
        stream there (its request is aborted)."""
        self._check()
        call_id = self._next_id()
        queue = self._waiting[call_id] = asyncio.Queue()
        decoder = self._decoder(item_type)
        done = False
        try:
            await self._sock.send_multipart((call_id, _STREAM, self._encoder.encode(msg)))
            while True:
                kind, payload = await queue.get()
                if kind == _ITEM:
                    yield decoder.decode(payload)
                    continue
                done = True
                if kind == _END:
                    return
                raise payload  # _ERROR, or PeerLost: an exception object
        finally:
            self._waiting.pop(call_id, None)
            if not done:
                self._cancel(call_id)

    def close(self, error: PeerLost | None = None) -> None:
        """Close the connection; whatever waits on it raises `error` (PeerLost)."""
        if self.lost is None:
            self._lose(error or PeerLost(f"connection to {self.address} closed"))
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    # -- internals --------------------------------------------------------------------------

    def _check(self) -> None:
        if self.lost is not None:
            raise self.lost

    def _next_id(self) -> bytes:
        return next(self._ids).to_bytes(8, "little")

    def _decoder(self, kind: Any) -> msgspec.msgpack.Decoder:
        decoder = self._decoders.get(kind)
        if decoder is None:
            decoder = self._decoders[kind] = msgspec.msgpack.Decoder(kind)
        return decoder

    def _cancel(self, call_id: bytes) -> None:
        if self.lost is None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart((call_id, _CANCEL), flags=zmq.NOBLOCK)

    async def _receive(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            waiter = self._waiting.get(frames[0]) if len(frames) >= 2 else None
            if waiter is None:
                continue  # cancelled meanwhile (or not a reply of ours)
            kind = frames[1]
            payload: Any = frames[2] if len(frames) > 2 else b""
            if kind == _ERROR:
                try:
                    error = msgspec.msgpack.decode(payload, type=protocol.Error)
                    payload = _error(error.kind, error.message)
                except msgspec.DecodeError as e:  # (never from our Server)
                    payload = RemoteError(f"unreadable error reply: {e}")
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait((kind, payload))
            elif not waiter.done():
                if kind == _ERROR:
                    waiter.set_exception(payload)
                else:
                    waiter.set_result(payload)

    async def _watch(self) -> None:
        """The socket monitor: a TCP disconnect (a dead process, missed heartbeats) loses
        this peer at once, and so does a refused connection (nothing listens there any
        more: a restarted worker listens on a new port)."""
        connected = False
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_CONNECTED:
                connected = True
            elif event == zmq.EVENT_CONNECT_RETRIED and not connected:
                self._close_lost(PeerLost(f"{self.address} refused the connection"))
                return
            elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED) and connected:
                self._close_lost(PeerLost(f"{self.address} disconnected"))
                return

    def _close_lost(self, error: PeerLost) -> None:
        """Lost for good: close the socket at once. Left open, ZeroMQ would retry the dead
        address every 100 ms for ever, and its monitor events, which no one reads any more,
        would fill the monitor's pipe; libzmq then blocks the context's I/O thread on the
        next event, and every connection of this process stops (heartbeats included: its
        peers see it disconnect minutes later)."""
        self._lose(error)
        self._tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        self.close(error)

    def _lose(self, error: PeerLost) -> None:
        if self.lost is not None:
            return
        self.lost = error
        for waiter in list(self._waiting.values()):
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait((_ERROR, error))
            elif not waiter.done():
                waiter.set_exception(error)
        if self.on_lost is not None:
            try:
                self.on_lost(error)
            except Exception:  # noqa: BLE001 - the caller's hook must not stop the monitor
                logger.exception("on_lost hook of the peer %s failed", self.address)
