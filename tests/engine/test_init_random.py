"""`cluster model init-random`: a random-weight Llama of the chosen size that our engine and
`transformers` load and agree on (greedy), with the tiny model's tokenizer."""

from __future__ import annotations

import json

from cluster.cli import main
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from tests.helpers import hf_greedy


def test_init_random_writes_a_model_of_that_size(tmp_path):
    out = tmp_path / "m"
    assert main(["model", "init-random", str(out), "--hidden-size", "128", "--num-layers",
                 "3", "--num-heads", "4", "--num-kv-heads", "2"]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (128, 3)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    prompt = [5, 17, 300, 42, 9, 11]
    engine = LLMEngine.from_model(str(out))
    ours = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert ours.token_ids == hf_greedy(out, [prompt], max_tokens=6)[0]


def test_init_random_refuses_heads_that_do_not_divide(tmp_path, capsys):
    assert main(["model", "init-random", str(tmp_path / "m"), "--hidden-size", "100"]) == 2
    assert "--num-heads" in capsys.readouterr().err
