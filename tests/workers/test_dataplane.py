"""The data plane alone (cluster/workers/dataplane.py): typed messages over real ZeroMQ
sockets on loopback. Calls and streams, errors that keep their class, cancellation that
reaches the handler, and a peer that dies or hangs noticed without any timeout of ours."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cluster.engine.async_engine import RequestAborted
from cluster.engine.sampling_params import SamplingParams
from cluster.kv_transfer.connector import NoCapacity
from cluster.workers import protocol
from cluster.workers.dataplane import Peer, PeerLost, RemoteError, Server
from cluster.workers.protocol import Abort, Chunk, Generate, Load, LoadQuery, RequestSpec

SPEC = RequestSpec("r1", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0), priority=2)


class Worker:
    """Handlers shaped like a worker's: one reply, one stream."""

    def __init__(self) -> None:
        self.seen: list = []
        self.closed = asyncio.Event()

    def handlers(self) -> dict:
        return {LoadQuery: self.load, Abort: self.abort, Generate: self.generate}

    async def load(self, _msg) -> Load:
        return Load(1, 2, 3, 64, 60, 0.0, num_kv_waiting=1, max_kv_waiters=8)

    async def abort(self, msg: Abort) -> bool:
        if msg.request_id == "full":
            raise NoCapacity("no KV room")
        if msg.request_id == "odd":
            raise ZeroDivisionError("boom")
        return msg.request_id == "r1"

    async def generate(self, msg: Generate):
        self.seen.append(msg)
        try:
            for i in range(msg.spec.params.max_tokens):
                if msg.spec.request_id == "fail" and i == 2:
                    raise RequestAborted("aborted on the instance")
                yield Chunk([i], str(i), finished=i == msg.spec.params.max_tokens - 1)
                if msg.spec.request_id == "slow":
                    await asyncio.sleep(3600)
        finally:
            self.closed.set()


@pytest.fixture
def pair():
    async def make():
        worker = Worker()
        server = Server(worker.handlers())
        server.start()
        return worker, server, Peer(server.address)

    return make


def test_calls_and_streams_carry_typed_messages(pair):
    async def main():
        worker, server, peer = await pair()
        load = await peer.call(LoadQuery(), Load, timeout=10)
        assert load == Load(1, 2, 3, 64, 60, 0.0, num_kv_waiting=1, max_kv_waiters=8)
        assert await peer.call(Abort("r1"), bool, timeout=10) is True
        chunks = [c async for c in peer.stream(Generate(SPEC, "tcp://x:1"), Chunk)]
        assert [c.token_ids for c in chunks] == [[0], [1], [2], [3]]
        assert [c.finished for c in chunks] == [False, False, False, True]
        (seen,) = worker.seen  # the request arrived whole: nested dataclasses included
        assert seen.spec == SPEC and seen.prefill == "tcp://x:1"
        assert seen.spec.params.max_tokens == 4 and seen.spec.priority == 2
        peer.close()
        server.close()

    asyncio.run(main())


def test_errors_keep_their_class(pair):
    async def main():
        _, server, peer = await pair()
        with pytest.raises(NoCapacity, match="no KV room"):
            await peer.call(Abort("full"), bool, timeout=10)
        with pytest.raises(RemoteError, match="ZeroDivisionError: boom"):
            await peer.call(Abort("odd"), bool, timeout=10)
        spec = RequestSpec("fail", [1], SamplingParams(max_tokens=5))
        got = []
        with pytest.raises(RequestAborted):
            async for chunk in peer.stream(Generate(spec), Chunk):
                got.append(chunk)
        assert len(got) == 2  # what came before the error still came

        def refuse(msg: Generate):  # refuses before any stream exists (a colocated worker
            raise ValueError("send no prefill")  # asked to drive a handoff does this)

        server.handlers[Generate] = refuse
        with pytest.raises(ValueError, match="send no prefill"):
            async for _ in peer.stream(Generate(SPEC, "tcp://x:1"), Chunk):
                pass
        peer.close()
        server.close()

    asyncio.run(main())


def test_a_message_the_server_cannot_read_is_refused():
    async def main():
        server = Server(Worker().handlers())
        server.start()
        peer = Peer(server.address)
        peer._tasks[0].cancel()  # read the reply here, not in the peer's receive loop
        await peer._sock.send_multipart((b"\x01" * 8, b"c", b"\xc1\xff"))  # not msgpack
        frames = await asyncio.wait_for(peer._sock.recv_multipart(), 10)
        assert frames[1] == b"x" and b"bad message" in frames[2]
        peer.close()
        server.close()

    asyncio.run(main())


def test_closing_a_stream_early_cancels_it_on_the_server(pair):
    async def main():
        worker, server, peer = await pair()
        spec = RequestSpec("slow", [1], SamplingParams(max_tokens=5))
        stream = peer.stream(Generate(spec), Chunk)
        assert (await anext(stream)).token_ids == [0]
        await stream.aclose()  # the client went away
        await asyncio.wait_for(worker.closed.wait(), 10)  # the handler's finally ran
        assert await peer.call(LoadQuery(), Load, timeout=10)
        peer.close()
        server.close()

    asyncio.run(main())


def test_a_call_that_times_out_raises_timeout(pair):
    async def main():
        _, server, peer = await pair()
        server.handlers[LoadQuery] = lambda _: asyncio.sleep(3600)
        with pytest.raises(TimeoutError):
            await peer.call(LoadQuery(), Load, timeout=0.2)
        peer.close()
        server.close()

    asyncio.run(main())


_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from cluster.workers.dataplane import Server
    from cluster.workers.protocol import LoadQuery

    async def hang(_):
        print("called", flush=True)
        await asyncio.sleep(3600)

    async def main():
        server = Server({LoadQuery: hang})
        server.start()
        print(server.address, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_peer_fails_what_waits_on_it(how):
    """Nothing here has a timeout: a call the server never answers ends with PeerLost once
    the process dies (the socket monitor sees the disconnect) or stops (heartbeats)."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})  # fmt: skip
    try:
        address = proc.stdout.readline().strip()

        async def main():
            peer = Peer(address)
            call = asyncio.ensure_future(peer.call(LoadQuery(), Load))
            # connected, the call waiting on the server: its handler says so
            called = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            assert called == "called\n" and not call.done()
            os.kill(proc.pid, getattr(signal, how))
            with pytest.raises(PeerLost):
                await call
            with pytest.raises(PeerLost):  # and the peer stays lost
                await peer.call(LoadQuery(), Load)
            # ... with its socket closed at once: no reconnecting to the dead address, and no
            # monitor events left unread (libzmq would block the I/O thread on them).
            assert peer._sock.closed and peer._monitor.closed
            peer.close()

        asyncio.run(main())
    finally:
        proc.kill()
        proc.wait()


def test_protocol_messages_round_trip_through_msgpack():
    import msgspec

    decoder = msgspec.msgpack.Decoder(protocol.Request)
    for msg in (Generate(SPEC), Abort("x"), LoadQuery(), protocol.Prefill(SPEC)):
        assert decoder.decode(msgspec.msgpack.encode(msg)) == msg
