"""Penalties, logit_bias and min_tokens: the engine's greedy output equals a reference that
applies the published semantics (OpenAI's presence/frequency penalties and logit_bias,
HF/vLLM's repetition penalty) to `transformers`' logits of the same weights, token for
token; rows that ask for nothing are untouched; min_tokens holds EOS, stop token ids and
stop strings back as vLLM does; bad values are refused with a message that says why."""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest
import torch

from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampler import Sampler
from cluster.engine.sampling_params import SamplingParams, StructuredOutputs
from cluster.workers.protocol import Generate, RequestSpec
from tests.helpers import random_prompts

NUM_TOKENS = 16
PROMPTS = random_prompts([5, 12, 30], seed=11)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32
    )
    return model.eval()


def reference_logits(logits: torch.Tensor, prompt: list[int], output: list[int],
                     p: SamplingParams) -> torch.Tensor:  # fmt: skip
    """The published semantics, one token at a time (deliberately not the engine's code)."""
    logits = logits.clone()
    for token_id, bias in (p.logit_bias or {}).items():
        logits[token_id] += bias  # OpenAI: added to the logits before sampling
    for token_id in set(prompt) | set(output):  # HF / vLLM: prompt and output
        value, penalty = logits[token_id], p.repetition_penalty
        logits[token_id] = value / penalty if value > 0 else value * penalty
    for token_id, count in Counter(output).items():  # OpenAI: output tokens only
        logits[token_id] -= count * p.frequency_penalty + p.presence_penalty
    return logits


def reference_greedy(hf_model, prompt: list[int], p: SamplingParams) -> list[int]:
    output: list[int] = []
    with torch.inference_mode():
        for _ in range(p.max_tokens):
            logits = hf_model(torch.tensor([prompt + output])).logits[0, -1].float()
            output.append(int(reference_logits(logits, prompt, output, p).argmax()))
    return output


CASES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.7),
    "negative": dict(presence_penalty=-1.0, frequency_penalty=-0.3),
    "repetition": dict(repetition_penalty=1.3),
    "repetition_below_1": dict(repetition_penalty=0.8),
    "logit_bias": dict(logit_bias={7: 3.0, 100: -2.5, 300: 5.0}),
    "all": dict(
        presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, logit_bias={9: 2.0}
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_equals_reference(engine, hf_model, case):
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True,
                            **CASES[case])  # fmt: skip
    plain = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    # Batched with plain greedy rows: those must come out as without the others.
    outs = engine.generate(PROMPTS + PROMPTS[:1], [params] * len(PROMPTS) + [plain])
    for prompt, out in zip(PROMPTS, outs, strict=False):
        assert out.token_ids == reference_greedy(hf_model, prompt, params), case
    alone = engine.generate(PROMPTS[:1], plain)[0]
    assert outs[-1].token_ids == alone.token_ids
    assert outs[0].token_ids != alone.token_ids  # the case changes something here


def test_penalties_change_greedy_output_of_a_repetitive_model(engine):
    greedy = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    plain = engine.generate(PROMPTS[0], greedy)[0].token_ids
    assert max(Counter(plain).values()) > 2  # the tiny random model repeats itself
    strong = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True,
                            presence_penalty=2.0)  # fmt: skip
    assert max(Counter(engine.generate(PROMPTS[0], strong)[0].token_ids).values()) == 1


def test_logit_bias_plus_100_forces_and_minus_100_bans(engine):
    forced = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True,
                            logit_bias={123: 100.0})  # fmt: skip
    assert engine.generate(PROMPTS[1], forced)[0].token_ids == [123] * 8
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    top = engine.generate(PROMPTS[1], greedy)[0].token_ids[0]
    banned = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                            logit_bias={top: -100.0})  # fmt: skip
    assert top not in engine.generate(PROMPTS[1], banned)[0].token_ids


def test_seeded_penalised_row_does_not_depend_on_its_batch(engine):
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=42, frequency_penalty=1.0,
                            repetition_penalty=1.1, logit_bias={5: 1.0})  # fmt: skip
    alone = engine.generate(PROMPTS[2], params)[0].token_ids
    mates = [SamplingParams(max_tokens=12, temperature=0.7), SamplingParams(temperature=0.0)]
    batched = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [*mates, params])
    assert batched[2].token_ids == alone


# -- min_tokens ---------------------------------------------------------------------------


def test_min_tokens_holds_eos_back(engine):
    eos = engine.eos_token_ids[0]
    wants_eos = dict(temperature=0.0, max_tokens=20, logit_bias={eos: 100.0})
    assert engine.generate(PROMPTS[0], SamplingParams(**wants_eos))[0].token_ids == [eos]
    out = engine.generate(PROMPTS[0], SamplingParams(**wants_eos, min_tokens=5))[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos and eos not in out.token_ids[:5]
    assert out.finish_reason == "stop"


def test_min_tokens_holds_stop_token_ids_back(engine):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, min_tokens=3,
                            stop_token_ids=[77], logit_bias={77: 100.0})  # fmt: skip
    out = engine.generate(PROMPTS[0], params)[0]
    assert out.token_ids[-1] == 77 and len(out.token_ids) == 4 and out.stop_reason == 77


def test_min_tokens_holds_stop_strings_back_as_vllm_does(engine):
    """A stop string matches only past min_tokens output tokens, in text that ends after
    theirs (vLLM's detokenizer, PR 22014)."""
    token = engine.tokenizer.encode("a")[-1]
    text = engine.tokenizer.decode([token])
    assert text == "a"
    forced = dict(temperature=0.0, max_tokens=20, ignore_eos=True, logit_bias={token: 100.0})
    out = engine.generate(PROMPTS[0], SamplingParams(**forced, stop=["a"]))[0]
    assert (out.text, len(out.token_ids)) == ("", 1)
    out = engine.generate(PROMPTS[0], SamplingParams(**forced, stop=["a"], min_tokens=3))[0]
    assert (out.text, len(out.token_ids), out.stop_reason) == ("aaa", 4, "a")
    out = engine.generate(PROMPTS[0], SamplingParams(**forced, stop=["aa"], min_tokens=3))[0]
    assert (out.text, len(out.token_ids)) == ("aa", 4)  # "aa" may begin before the boundary


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(presence_penalty=2.5), "presence_penalty must be in"),
        (dict(frequency_penalty=-3), "frequency_penalty must be in"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty must be finite"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(repetition_penalty="1"), "repetition_penalty must be a number"),
        (dict(logit_bias={5: 101}), "logit_bias values must be in"),
        (dict(logit_bias={-1: 1}), "logit_bias keys must be token ids"),
        (dict(logit_bias={"5": 1}), "logit_bias keys must be token ids"),
        (dict(logit_bias={5: "x"}), r"logit_bias\[5\] must be a number"),
        (dict(logit_bias=[(5, 1.0)]), "logit_bias must map token ids to numbers"),
        (dict(logit_bias={i: 1.0 for i in range(301)}), "at most 300"),
        (dict(min_tokens=-1), "min_tokens must be in"),
        (dict(min_tokens=17), r"min_tokens must be in \[0, max_tokens=16\]"),
        (dict(min_tokens=1.5), "min_tokens must be an integer"),
        (dict(prompt_logprobs=21), "prompt_logprobs must be in"),
        (dict(prompt_logprobs=True), "prompt_logprobs must be an integer"),
        (dict(structured_outputs={"json": "{}"}), "structured_outputs must be StructuredOutputs"),
    ],
)
def test_bad_values_say_what_to_change(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_logit_bias_token_ids_are_checked_against_the_vocabulary(engine):
    vocab = engine.model_config.vocab_size
    with pytest.raises(ValueError, match=r"logit_bias has token ids outside the vocabulary"):
        engine.add_request("bad-bias", PROMPTS[0], SamplingParams(logit_bias={vocab: 1.0}))
    assert not engine.has_unfinished()
    engine.check_integrity()


def test_sampler_without_histories_refuses_penalties():
    params = [SamplingParams(temperature=0.0, presence_penalty=1.0)]
    with pytest.raises(ValueError, match="token history"):
        Sampler()(torch.randn(1, 16), params, [None])


# -- the wire --------------------------------------------------------------------------------


def test_new_fields_round_trip_through_msgspec():
    params = SamplingParams(
        max_tokens=9, presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.1,
        logit_bias={3: 1.5, 400: -100.0}, min_tokens=2, prompt_logprobs=3,
        structured_outputs=StructuredOutputs(choice=["yes", "no"]),
    )  # fmt: skip
    msg = Generate(RequestSpec("r1", [1, 2, 3], params))
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=Generate)
    assert decoded == msg
    assert decoded.spec.params.logit_bias == {3: 1.5, 400: -100.0}
    assert isinstance(decoded.spec.params.structured_outputs, StructuredOutputs)
    for so in (
        StructuredOutputs(json='{"type": "object"}', disable_any_whitespace=True),
        StructuredOutputs(json_object=True),
        StructuredOutputs(regex="[a-z]+"),
        StructuredOutputs(grammar='root ::= "x"'),
    ):
        spec = RequestSpec("r", [1], SamplingParams(structured_outputs=so))
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=RequestSpec) == spec


def test_msgspec_decode_validates_the_new_fields():
    good = msgspec.msgpack.encode(RequestSpec("r", [1], SamplingParams(min_tokens=1)))
    raw = msgspec.msgpack.decode(good)
    for bad in ({"min_tokens": 99}, {"logit_bias": {"1": 1.0}},
                {"structured_outputs": {"regex": "a", "choice": ["b"]}}):  # fmt: skip
        tampered = {**raw, "params": {**raw["params"], **bad}}
        with pytest.raises(msgspec.ValidationError):
            msgspec.msgpack.decode(msgspec.msgpack.encode(tampered), type=RequestSpec)
