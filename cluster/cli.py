"""The `cluster` command: model utilities, local generation and benchmarks.

cluster serve [--model DIR] [...]    serve the cluster: gRPC :50051, OpenAI HTTP :8000
cluster generate "prompt" [...]      stream from a running `cluster serve` (--local: no server)
cluster status [--watch] [--json]    pools, instances, load and KV usage of a running cluster
cluster model init-tiny DIR          write the deterministic tiny default model
cluster model init-random DIR        a seeded random-weight Llama of a chosen size
cluster bench engine [--json]        engine throughput against transformers
cluster bench transfer [--json]      NIXL KV pull bandwidth against memcpy
cluster bench router [--json]        serving overhead per request/token; TTFT P/D vs colocated
cluster bench placement [--json]     planning time, planned goodput P/D vs colocated, fit error
cluster bench layerwise [--json]     KV pulled layer by layer during prefill vs after it
cluster bench reshard [--json]       KV pulls across TP/PP layouts vs same-layout pulls
cluster bench pipeline [--json]      pipeline-parallel micro-batching against PP=1
cluster bench chaos [--json]         serving under killed/stopped actors and lost notifications
cluster bench routing [--json]       KV-aware against load routing on multi-turn conversations
cluster bench elastic [--json]       autoscaled pools on a shifting trace against static peak
cluster bench serve --ttft S --tpot S  SLO attainment vs rate, goodput per GPU, HTML report
cluster bench compare --ttft S ...   the same, disaggregated against colocated, one report
cluster deploy kuberay --plan PLAN   the KubeRay RayService (+ PodMonitor) that runs a plan
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from cluster.engine.config import CacheConfig, EngineConfig, SchedulerConfig


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(metavar="COMMAND")

    model = sub.add_parser("model", help="model utilities").add_subparsers(metavar="ACTION")
    init = model.add_parser("init-tiny", help="write the deterministic tiny Llama")
    init.add_argument("dir", help="output folder")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=_init_tiny)
    rand = model.add_parser(
        "init-random", help="a seeded random-weight Llama of a chosen size (the tiny's tokenizer)"
    )
    rand.add_argument("dir", help="output folder")
    rand.add_argument("--hidden-size", type=int, default=256)
    rand.add_argument("--num-layers", type=int, default=8)
    rand.add_argument("--num-heads", type=int, default=8)
    rand.add_argument("--num-kv-heads", type=int, default=4)
    rand.add_argument("--max-position-embeddings", type=int, default=4096)
    rand.add_argument("--seed", type=int, default=0)
    rand.set_defaults(func=_init_random)

    serve = sub.add_parser("serve", help="serve the disaggregated cluster (gRPC + HTTP)")
    _add_serve(serve)

    gen = sub.add_parser("generate", help="generate text through a running cluster")
    gen.add_argument("prompt", nargs="+", help="one or more prompts")
    gen.add_argument("--target", default="127.0.0.1:50051", help="gRPC address of the router")
    gen.add_argument(
        "--api-key",
        default=os.environ.get("PD_CLUSTER_API_KEY"),
        help="bearer token, if the server wants one (or set PD_CLUSTER_API_KEY)",
    )
    gen.add_argument(
        "--tls-ca",
        help="PEM CA of the server's certificate: call it over TLS (or set PD_CLUSTER_TLS_CA)",
    )
    gen.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    gen.add_argument("--local", action="store_true", help="run an engine here, no server")
    add_engine_arguments(gen)
    add_sampling_arguments(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.set_defaults(func=_generate)

    status = sub.add_parser("status", help="pools, instances and load of a running cluster")
    _add_status(status)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(metavar="BENCHMARK")
    for name, help_ in _MODULE_BENCHES:
        _add_module_bench(bench.add_parser(name, help=help_), f"{name}_bench")
    serve_bench = bench.add_parser("serve", help="goodput: SLO attainment against rate")
    compare_bench = bench.add_parser("compare", help="goodput, disaggregated vs colocated")
    _add_serve_bench(serve_bench, compare_bench)

    deploy = sub.add_parser("deploy", help="deployment manifests").add_subparsers(metavar="TARGET")
    kuberay = deploy.add_parser("kuberay", help="a KubeRay RayService for a placement plan")
    _add_kuberay(kuberay)
    return parser


_MODULE_BENCHES = (  # `cluster bench NAME` runs cluster/bench/NAME_bench.py
    ("engine", "engine tokens/s against transformers"),
    ("transfer", "NIXL KV pull bandwidth against memcpy"),
    ("router", "serving overhead and TTFT, P/D vs colocated"),
    ("placement", "planner: time, plans, fitted error"),
    ("layerwise", "KV pulled layer by layer vs whole"),
    ("reshard", "KV pulls across TP/PP layouts vs same"),
    ("pipeline", "PP micro-batching against PP=1"),
    ("chaos", "serving under faults: hung, wrong, leaked blocks"),
    ("routing", "KV-aware vs load routing, multi-turn sessions"),
    ("elastic", "autoscaled pools vs static peak, shifting load"),
)


def _add_module_bench(parser: argparse.ArgumentParser, module: str) -> None:
    """A benchmark of cluster/bench/<module>.py: its add_arguments, its run (prints and
    returns its result; the exit code is 0)."""
    import importlib

    bench = importlib.import_module(f"cluster.bench.{module}")
    bench.add_arguments(parser)
    parser.set_defaults(func=lambda args: bench.run(args) and 0)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face checkpoint folder (default: the embedded tiny model)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", type=int, default=None, metavar="BYTES")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)


def engine_config_from_args(args: argparse.Namespace, role: str = "colocated") -> EngineConfig:
    return EngineConfig(
        model=args.model,
        role=role,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory_bytes=args.kv_cache_memory,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
        ),
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def sampling_params_from_args(args: argparse.Namespace):
    from cluster.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _init_tiny(args: argparse.Namespace) -> int:
    from cluster.engine.tiny import write_tiny_model

    path = write_tiny_model(args.dir, seed=args.seed)
    print(f"wrote the tiny Llama to {path}")
    return 0


def _init_random(args: argparse.Namespace) -> int:
    """Benchmarks that need prompt compute to matter on a CPU (the tiny model's is almost
    free): a Llama whose size is chosen, random weights, the tiny model's vocabulary."""
    from transformers import LlamaConfig

    from cluster.engine.tiny import TINY_CONFIG, default_model_dir, save_random_checkpoint

    if args.hidden_size % args.num_heads or args.num_heads % args.num_kv_heads:
        print("error: --hidden-size must divide by --num-heads, and that by --num-kv-heads",
              file=sys.stderr)  # fmt: skip
        return 2
    config = LlamaConfig(
        vocab_size=TINY_CONFIG["vocab_size"], hidden_size=args.hidden_size,
        intermediate_size=-(-args.hidden_size * 11 // 4 // 64) * 64,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        bos_token_id=TINY_CONFIG["bos_token_id"], eos_token_id=TINY_CONFIG["eos_token_id"],
        pad_token_id=TINY_CONFIG.get("pad_token_id"), tie_word_embeddings=False,
    )  # fmt: skip
    path = save_random_checkpoint(config, args.dir, args.seed, default_model_dir())
    print(f"wrote a random-weight Llama ({args.num_layers} layers, hidden {args.hidden_size}) "
          f"to {path}")  # fmt: skip
    return 0


def _generate(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    if not args.local:
        from cluster.client import generate

        return generate(args.target, args.prompt, params, args.api_key, args.json, args.timeout,
                        args.tls_ca)  # fmt: skip
    return _generate_local(args, params)


def _generate_local(args: argparse.Namespace, params) -> int:
    from cluster.engine.llm_engine import LLMEngine

    start = time.perf_counter()
    engine = LLMEngine(engine_config_from_args(args))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    outputs = engine.generate(args.prompt, params)
    gen_s = time.perf_counter() - start
    num_tokens = sum(len(o.token_ids) for o in outputs)
    for prompt, out in zip(args.prompt, outputs, strict=True):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": out.text,
                        "token_ids": out.token_ids,
                        "finish_reason": out.finish_reason,
                    }
                )
            )
        else:
            print(f"{prompt!r} -> {out.text!r}  [{len(out.token_ids)} tokens, {out.finish_reason}]")
    model = engine.config.model or "tiny default model"
    print(
        f"model: {model}; loaded in {load_s:.2f}s; {num_tokens} tokens in {gen_s:.2f}s "
        f"({num_tokens / max(gen_s, 1e-9):.0f} tok/s)",
        file=sys.stderr,
    )
    return 0


def _add_serve(parser: argparse.ArgumentParser) -> None:
    from cluster import serve

    serve.add_arguments(parser)
    parser.set_defaults(func=serve.run)


def _add_status(parser: argparse.ArgumentParser) -> None:
    from cluster import status

    status.add_arguments(parser)
    parser.set_defaults(func=status.run)


def _add_kuberay(parser: argparse.ArgumentParser) -> None:
    from cluster.deploy import kuberay

    kuberay.add_arguments(parser)
    parser.set_defaults(func=kuberay.run)


def _add_serve_bench(serve: argparse.ArgumentParser, compare: argparse.ArgumentParser) -> None:
    from cluster.bench import serve_bench

    serve_bench.add_serve_arguments(serve)
    serve.set_defaults(func=serve_bench.run, command="serve")
    serve_bench.add_compare_arguments(compare)
    compare.set_defaults(func=serve_bench.run, command="compare")


if __name__ == "__main__":
    sys.exit(main())
