"""The `placement` command. For now: `placement spec`, the sizes of a model that placement
decisions start from (weights and KV bytes per token). The planner itself (latency models,
simulator, search) is the placement issue's work."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from cluster.engine.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_spec(config: ModelConfig, dtype: torch.dtype) -> dict:
    """Parameter count and byte sizes of a Llama-family model."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_layers
    q_size = config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    per_layer = hidden * (q_size + 2 * kv_size) + q_size * hidden + 3 * hidden * inter
    per_layer += 2 * hidden + (2 * config.head_dim if config.qk_norm else 0)
    if config.qkv_bias:
        per_layer += q_size + 2 * kv_size
    embed = config.vocab_size * hidden
    num_params = layers * per_layer + embed + hidden + (0 if config.tie_word_embeddings else embed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return {
        "architecture": config.architecture,
        "num_params": num_params,
        "weight_bytes": num_params * itemsize,
        "kv_bytes_per_token": config.kv_bytes_per_token(dtype),
        "num_layers": layers,
        "hidden_size": hidden,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": inter,
        "vocab_size": config.vocab_size,
        "dtype": str(dtype).removeprefix("torch."),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="placement", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(metavar="COMMAND")
    spec = sub.add_parser("spec", help="parameters, weight and KV bytes of a model")
    spec.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    spec.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    spec.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not hasattr(args, "model"):
        parser.print_help()
        return 2
    try:
        info = model_spec(ModelConfig.from_pretrained(args.model), _DTYPES[args.dtype])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:20s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
