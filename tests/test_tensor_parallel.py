"""Tensor parallelism inside one instance (cluster/engine/parallel.py): every rank is its own
process running the same engine over its weight shards, gloo all-reduces between them. Greedy
output of TP=2 and TP=4 (KV heads replicated: 2 KV heads over 4 ranks) equals TP=1 and the
`transformers` reference, for the tiny Llama and for Qwen2 (q/k/v biases: sharded with their
heads) and a tied-embedding Llama."""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest

from tests.test_engine_correctness import hf_greedy

PROMPTS = [[5, 6, 7], list(range(3, 40)), [11 + (i * 7) % 400 for i in range(90)]]
MAX_TOKENS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, port: int, model_dir: str, queue) -> None:
    import torch

    from cluster.engine.config import CacheConfig, EngineConfig
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)
    try:
        engine = LLMEngine(
            EngineConfig(
                model=model_dir,
                tensor_parallel_size=size,
                tensor_parallel_rank=rank,
                dist_init_method=f"tcp://127.0.0.1:{port}",
                cache=CacheConfig(num_blocks=64),
            )
        )
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        out = [o.token_ids for o in engine.generate(PROMPTS, params)]
        shape = tuple(engine.runner.kv_cache.shape)
        engine.check_integrity()
        queue.put((rank, out, shape, None))
    except Exception as e:  # noqa: BLE001 - report to the test, do not hang it
        queue.put((rank, None, None, repr(e)))


def run_tp(model_dir: str, size: int) -> list:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, size, port, model_dir, queue)) for r in range(size)
    ]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    errors = [e for *_, e in results if e]
    assert not errors, errors
    return results


@pytest.mark.parametrize("size", [2, 4])
def test_tp_equals_tp1_and_transformers(tiny_model_dir, size):
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.sampling_params import SamplingParams

    expected = hf_greedy(str(tiny_model_dir), PROMPTS, MAX_TOKENS)
    single = LLMEngine.from_model(str(tiny_model_dir))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in single.generate(PROMPTS, params)] == expected
    results = run_tp(str(tiny_model_dir), size)
    for rank, out, shape, _ in results:
        assert out == expected, f"rank {rank}"
        # Each rank caches only its KV heads: 2 KV heads split (TP=2) or one each (TP=4).
        assert shape[4] == 1


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama-linear-rope-tied"])
def test_tp2_on_other_families(family_model_dir, family):
    model_dir = str(family_model_dir(family))
    expected = hf_greedy(model_dir, PROMPTS, MAX_TOKENS)
    for _, out, _, _ in run_tp(model_dir, 2):
        assert out == expected


def test_tp_refuses_bad_settings(tiny_model_dir):
    from cluster.engine.config import EngineConfig

    with pytest.raises(ValueError, match="dist_init_method"):
        EngineConfig(model=str(tiny_model_dir), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_rank"):
        EngineConfig(tensor_parallel_size=2, tensor_parallel_rank=2, dist_init_method="tcp://x:1")
