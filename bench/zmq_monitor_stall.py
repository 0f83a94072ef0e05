"""Reproduces the libzmq stall behind the decode freeze (docs/benchmarks.md, "Elastic pools"):
a DEALER socket retrying a dead address, whose monitor socket is never read, blocks the
context's I/O thread once the monitor's pipe fills; a live pair in the same context then
stops. Prints how long the live pair kept working (at most 400 s).

    .venv/bin/python bench/zmq_monitor_stall.py
"""

import socket
import sys
import time

import zmq

ctx = zmq.Context.instance()
s = socket.socket()
s.bind(("127.0.0.1", 0))
dead = s.getsockname()[1]  # a port nothing listens on
s.close()
d = ctx.socket(zmq.DEALER)
d.setsockopt(zmq.LINGER, 0)
events = (zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED | zmq.EVENT_CLOSED
          | zmq.EVENT_CONNECT_RETRIED)  # fmt: skip
monitor = d.get_monitor_socket(events)  # never read
d.connect(f"tcp://127.0.0.1:{dead}")
r = ctx.socket(zmq.ROUTER)
port = r.bind_to_random_port("tcp://127.0.0.1")
c = ctx.socket(zmq.DEALER)
c.connect(f"tcp://127.0.0.1:{port}")
t0 = time.time()
while time.time() - t0 < 400:
    c.send(b"ping")
    if not r.poll(5000):
        print(f"live pair stuck after {time.time() - t0:.0f} s", flush=True)
        sys.exit(1)
    r.recv_multipart()
    time.sleep(1)
print("live pair fine for 400 s", flush=True)
