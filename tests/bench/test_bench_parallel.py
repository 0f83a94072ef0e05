"""`cluster bench reshard --quick` (re-sharded vs same-layout pulls between two Ray actor
processes over real NIXL, bytes checked inside) and `cluster bench pipeline --quick` (PP=2
instances in spawned processes over gloo against one engine)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # ~20 s for the two


def test_bench_reshard_quick(capsys):
    pytest.importorskip("ray")
    pytest.importorskip("nixl")
    from cluster.cli import main

    assert main(["bench", "reshard", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["prefill"]["tp"], r["prefill"]["pp"], r["decode"]["tp"], r["decode"]["pp"]): r
            for r in result["rows"]}  # fmt: skip
    m = result["model"]
    blocks = -(-64 // m["block_size"])
    # decode TP1 from prefill TP2: one READ per prefill rank, at most one descriptor per
    # block from each (a rank's heads, all layers, are one range), the whole pool's bytes
    r = rows[(2, 1, 1, 1)]
    assert r["num_reads"] == 2 and 2 <= r["resharded_descs"] <= 2 * blocks
    assert r["bytes"] == blocks * m["layers"] * 2 * m["kv_heads"] * 16 * m["head_dim"] * 2
    # decode TP2 rank from prefill PP2: one READ per stage, a descriptor per block and head
    pp = rows[(1, 2, 2, 1)]
    assert pp["num_reads"] == 2 and pp["resharded_descs"] <= 2 * blocks * m["kv_heads"] // 2
    # same layout through the re-shard path: whole blocks, as many runs as a block pull
    same = rows[(2, 1, 2, 1)]
    assert same["num_reads"] == 1 and same["resharded_descs"] == same["same_layout_descs"]
    assert all(r["resharded_ms"] > 0 and r["same_layout_ms"] > 0 for r in result["rows"])


def test_bench_pipeline_quick(capsys):
    from cluster.cli import main

    assert main(["bench", "pipeline", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(r["pp"], r["microbatches"]) for r in result["rows"]] == [(1, 1), (2, 1), (2, 2),
                                                                      (2, 4)]  # fmt: skip
    assert all(r["same_tokens_as_pp1"] for r in result["rows"])
    assert all(r[p]["median_s"] > 0 for r in result["rows"] for p in ("prefill", "decode"))
