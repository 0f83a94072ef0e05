"""What structured outputs cost the engine: decode throughput (output tokens/s) of a batch of
requests sampled under a JSON schema against the same batch sampled freely, on this CPU.

    python3 bench/structured_outputs.py [--models tiny,8x256,8x256-v32k] [--batch 32]
                                        [--output-len 128] [--repeats 5] [--json]

Models (or checkpoint folders): `tiny` (the default tiny Llama, vocabulary 512), `8x256` (a
random Llama of 8 layers, hidden 256, the tiny vocabulary: what `cluster model init-random
--num-layers 8 --hidden-size 256` writes) and `8x256-v32k` (the same shape over a
32,000-token byte-level BPE trained here on the Python standard library's sources: the
grammar's per-step work grows with the vocabulary).

Both runs sample at temperature 1 with per-request seeds and the same prompts. The schema's
smallest valid output is longer than --output-len, so every request decodes exactly
--output-len tokens in both runs (the free run ignores EOS). Only decode steps are timed
(from the step after every request has its first token); runs alternate free/JSON to share
the machine's load; the best and the median of --repeats are reported (on a machine others
share, the best is the run least disturbed by them)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cluster.engine.config import EngineConfig  # noqa: E402
from cluster.engine.llm_engine import LLMEngine  # noqa: E402
from cluster.engine.sampling_params import SamplingParams, StructuredOutputs  # noqa: E402

# A list of records that must hold at least 100 of them: never complete within the run.
SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 100,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "name": {"type": "string"},
                    "kind": {"enum": ["alpha", "beta", "gamma"]},
                    "score": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["id", "name", "kind", "score", "tags"],
            },
        }
    },
    "required": ["records"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,8x256,8x256-v32k")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave it)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results.append(measure(name, model_dir(name, Path(tmp)), args))
            print(format_row(results[-1]), file=sys.stderr)
    out = {
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "args": vars(args),
        "results": results,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def model_dir(name: str, tmp: Path) -> str | None:
    if name == "tiny":
        return None
    if Path(name).is_dir():  # a checkpoint folder
        return name
    from transformers import LlamaConfig

    from cluster.engine.tiny import TINY_CONFIG, default_model_dir, save_random_checkpoint

    vocab_size, tokenizer_dir = TINY_CONFIG["vocab_size"], default_model_dir()
    if name == "8x256-v32k":
        vocab_size, tokenizer_dir = 32000, write_big_tokenizer(tmp / "tokenizer", 32000)
    elif name != "8x256":
        raise SystemExit(f"unknown model {name!r}: tiny, 8x256 or 8x256-v32k")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=TINY_CONFIG["bos_token_id"], eos_token_id=TINY_CONFIG["eos_token_id"],
        pad_token_id=TINY_CONFIG.get("pad_token_id"), tie_word_embeddings=False,
    )  # fmt: skip
    return str(save_random_checkpoint(config, tmp / name, 0, tokenizer_dir))


def write_big_tokenizer(out: Path, vocab_size: int) -> Path:
    """A byte-level BPE of `vocab_size` trained on the standard library's .py files (on every
    machine, no download), with the tiny model's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cluster.engine.tiny import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tokenizer.train([str(f) for f in files], trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN,
                                 eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                 clean_up_tokenization_spaces=False)  # fmt: skip
    hf.save_pretrained(str(out))
    return out


def measure(name: str, path: str | None, args) -> dict:
    engine = LLMEngine(EngineConfig(model=path))
    vocab = engine.model_config.vocab_size
    schema = StructuredOutputs(json=json.dumps(SCHEMA))
    engine.compile_grammar(SamplingParams(structured_outputs=schema))
    runs: dict[str, list[float]] = {"free": [], "json": []}
    run(engine, args, None, vocab, seed=1000)  # warm up both paths
    run(engine, args, schema, vocab, seed=1000)
    for r in range(args.repeats):
        runs["free"].append(run(engine, args, None, vocab, seed=r))
        runs["json"].append(run(engine, args, schema, vocab, seed=r))
    best = {k: max(v) for k, v in runs.items()}
    median = {k: statistics.median(v) for k, v in runs.items()}
    return {"model": name, "vocab_size": vocab, "best": best, "median": median,
            "json_vs_free_best": best["json"] / best["free"],
            "json_vs_free_median": median["json"] / median["free"], "runs": runs}  # fmt: skip


def run(engine: LLMEngine, args, schema, vocab: int, seed: int) -> float:
    """Decode tokens/s of one batch (prefill excluded)."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(args.batch):
        prompt = torch.randint(3, min(vocab, 512), (args.prompt_len,), generator=gen).tolist()
        params = SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=seed * 1000 + i,
                                ignore_eos=True, structured_outputs=schema)  # fmt: skip
        engine.add_request(f"{seed}-{i}", prompt, params)
    counts = {}
    while len(counts) < args.batch or min(counts.values()) < 1:
        for out in engine.step():
            counts[out.request_id] = len(out.token_ids)
    start, before = time.perf_counter(), sum(counts.values())
    while engine.has_unfinished():
        for out in engine.step():
            counts[out.request_id] = len(out.token_ids)
    elapsed = time.perf_counter() - start
    assert all(n == args.output_len for n in counts.values()), counts  # nobody ended early
    for failed in engine.take_failed():
        raise RuntimeError(f"request failed: {failed}")
    return (sum(counts.values()) - before) / elapsed


def format_row(r: dict) -> str:
    b, m = r["best"], r["median"]
    return (f"{r['model']:>12} vocab {r['vocab_size']:>6}: best free {b['free']:7.0f} json "
            f"{b['json']:7.0f} tok/s ({r['json_vs_free_best']:.1%}); median free "
            f"{m['free']:7.0f} json {m['json']:7.0f} ({r['json_vs_free_median']:.1%})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
