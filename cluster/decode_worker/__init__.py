"""Decode and colocated instances (the workers live in cluster/workers/decode.py)."""

from cluster.workers.decode import ColocatedWorker, DecodeWorker

__all__ = ["ColocatedWorker", "DecodeWorker"]
