"""The workers: one engine in one role (prefill, decode, colocated) behind typed messages.

base.py      EngineWorker: the engine, its load report, metrics, the data-plane server
prefill.py   PrefillWorker: runs prompts, leases their KV blocks to a puller
decode.py    ColocatedWorker, DecodeWorker: stream output; the decode side drives the
             handoff (prefill call over the data plane, NIXL READ, first token, stream)
ranks.py     follower ranks of a TP/PP instance (Ray actors), rank groups for KV pulls
protocol.py  the typed messages that are the whole worker API
dataplane.py Server (worker side) and Peer (caller side): ZeroMQ + msgspec
clients.py   InstanceClient: the router's handle on one instance (control over Ray or in
             process, data over a Peer)
"""
