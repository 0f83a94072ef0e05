"""Prefill instances (the worker lives in cluster/workers/prefill.py)."""

from cluster.workers.prefill import PrefillWorker

__all__ = ["PrefillWorker"]
