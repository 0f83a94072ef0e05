"""The deterministic tiny default model: a 4-layer GQA Llama with a byte-level BPE tokenizer.

Everything is generated offline from code in this module (tokenizer trained on an embedded
corpus, weights drawn from a seeded generator), so tests and demos never touch a model hub and
every machine builds byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = 0, 1, 2
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]

# Bump the suffix whenever anything below changes: cached copies are keyed by it.
DEFAULT_MODEL_NAME = "tiny-llama-v1"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TINY_CONFIG: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    # Old transformers read rope_theta/rope_scaling, new ones read rope_parameters.
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": PAD_TOKEN_ID,
    "torch_dtype": "float32",
    "dtype": "float32",
    "use_cache": True,
}

_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

_CORPUS = """\
The little lighthouse stood at the end of the harbour wall. Every night at 9:30 the keeper
climbed 112 steps, wound the clockwork, and lit the lamp. Ships came and went: fishing boats,
ferries, and once, in the winter of 1987, a tall ship with three masts and 24 sails.

"Why do you still do it?" asked the girl from the café on the corner. "The lamp is automatic
now, isn't it?" The keeper laughed. "Perhaps. But a machine does not notice the fog rolling in,
or the sound of an engine that is running too hot. I do." She thought that was a naïve answer,
but she did not say so; instead she brought him coffee, a croissant, and the evening paper.

A server receives a request, splits the prompt into tokens, and runs the model over them.
The first pass (prefill) reads the whole prompt at once; the second phase (decode) produces one
token at a time. Prefill is limited by compute, decode by memory bandwidth. Putting the two
phases on different machines lets each one run at its best: 8 GPUs for prefill, 16 for decode,
or whatever ratio the traffic needs. The key-value cache moves between them over the network.

Numbers matter here. A request with 2048 prompt tokens and 256 output tokens at 50 ms per
output token takes about 12.8 s to finish decoding, plus the time to first token. If the target
is 200 ms for the first token and 40 ms between tokens, the planner has to place replicas so
that both limits hold at the 99th percentile, not just on average.

Some words travel far. Résumé, déjà vu, façade, jalapeño, über, and smörgåsbord came into
English from other languages. In Tokyo the signs say 日本語 and 東京; in Moscow they say
Москва; in Athens, Αθήνα. A good tokenizer must handle all of them, byte by byte if it has to.

Lists, code, and punctuation appear everywhere: [1, 2, 3], {"key": "value"}, x = y + 1;
if (a < b) { return a; } else { return b; } -- and sometimes a question? Often an answer!
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump!

In the morning the keeper walked home along the beach, counting gulls: one, two, three, four,
five, six, seven, eight, nine, ten. The tide was out; the sand was wet and bright. He was tired,
but the lamp had burned all night, and every ship had found its way home.
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the embedded corpus; same input, same tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS], trainer=trainer)
    return tokenizer


def _param_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama parameter names and shapes, in the fixed order the generator fills them."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim, vocab = config["head_dim"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        specs += [
            (f"{prefix}.self_attn.q_proj.weight", (q_dim, hidden)),
            (f"{prefix}.self_attn.k_proj.weight", (kv_dim, hidden)),
            (f"{prefix}.self_attn.v_proj.weight", (kv_dim, hidden)),
            (f"{prefix}.self_attn.o_proj.weight", (hidden, q_dim)),
            (f"{prefix}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{prefix}.mlp.up_proj.weight", (inter, hidden)),
            (f"{prefix}.mlp.down_proj.weight", (hidden, inter)),
            (f"{prefix}.input_layernorm.weight", (hidden,)),
            (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def _build_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    std = config["initializer_range"]
    weights: dict[str, torch.Tensor] = {}
    for name, shape in _param_specs(config):
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=torch.float32)
        else:
            tensor = torch.empty(shape, dtype=torch.float32)
            weights[name] = tensor.normal_(0.0, std, generator=generator)
    return weights


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_tokenizer(model_dir: Path, vocab_size: int) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(vocab_size),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Cleanup rewrites " ." as "." across token boundaries, which breaks streaming decode.
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    # Keep the template inside tokenizer_config.json: transformers 4.x ignores chat_template.jinja.
    hf_tokenizer.save_pretrained(str(model_dir), save_jinja_files=False)
    config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 writes its own class name, which 4.x cannot resolve; both know this one.
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(config_path, tokenizer_config)


def write_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Write config, generation config, weights and tokenizer of the tiny model into ``path``."""
    model_dir = Path(path)
    model_dir.mkdir(parents=True, exist_ok=True)
    _write_json(model_dir / "config.json", TINY_CONFIG)
    _write_json(
        model_dir / "generation_config.json",
        {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID},
    )
    weights = _build_weights(TINY_CONFIG, seed)
    weights_path = model_dir / "model.safetensors"
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    weights_path.chmod(0o644)  # safetensors writes 0600; match the other files
    _write_tokenizer(model_dir, TINY_CONFIG["vocab_size"])
    return model_dir


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _MODEL_FILES)


def _publish(staging: Path, model_dir: Path) -> None:
    try:
        os.rename(staging, model_dir)
    except OSError as exc:
        # Losing the race to another process is fine: its copy is identical to ours.
        if not _is_complete(model_dir):
            raise RuntimeError(
                f"cannot create {model_dir}: it exists but is incomplete; delete it and retry"
            ) from exc


def default_model_dir() -> Path:
    """Directory of the embedded default model, built on first use under the cache root."""
    cache_root = os.environ.get("PD_CLUSTER_CACHE")
    root = Path(cache_root) if cache_root else Path.home() / ".cache" / "pd-cluster"
    model_dir = root / DEFAULT_MODEL_NAME
    if _is_complete(model_dir):
        return model_dir
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place so readers never see a half-written dir.
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=root))
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0700; the cache is meant to be readable
        write_tiny_model(staging)
        _publish(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def save_random_checkpoint(
    config,
    out_dir: str | Path,
    seed: int,
    tokenizer_dir: str | Path,
    adjust: Callable[[torch.nn.Module], None] | None = None,
) -> Path:
    """A seeded random-weight `transformers` model of `config` (any *Config object), saved with
    save_pretrained as safetensors, with the tokenizer files of `tokenizer_dir` beside it. The
    global RNG is left as it was; `adjust` may edit the weights (under no_grad) before saving."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if adjust is not None:
            with torch.no_grad():
                adjust(model)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir
