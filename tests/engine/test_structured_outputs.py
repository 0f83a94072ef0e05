"""Structured outputs (xgrammar): on the tiny random model at temperature 1, every output
follows its JSON schema, regex, choice or EBNF grammar, because the grammar masks what the
model may sample. Invalid grammars are a ValueError at add_request that leaves nothing
behind; compiled grammars are cached; a request continued elsewhere (decode role, resume)
continues from the grammar state its output implies, with the same tokens as one run; the
emulated and noop runners follow grammars too (their prompt logprobs are placeholders)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
import xgrammar as xgr

from cluster.engine.config import CacheConfig, EngineConfig
from cluster.engine.llm_engine import LLMEngine, Resume
from cluster.engine.sampling_params import SamplingParams, StructuredOutputs
from cluster.engine.structured import RowMasks
from tests.helpers import random_prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        # A bounded string. Not maxLength: xgrammar 0.2.9 lets raw control characters into a
        # string with minLength/maxLength (mlc-ai/xgrammar#800, open): invalid JSON.
        "name": {"type": "string", "pattern": "^[A-Za-z0-9 ]{0,6}$"},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "count", "name", "ok"],
    "additionalProperties": False,
}
JSON = StructuredOutputs(json=json.dumps(SCHEMA))
# Greedy, the random model keeps picking whitespace between JSON tokens: vLLM's option keeps
# it to the separators.
COMPACT_JSON = StructuredOutputs(json=json.dumps(SCHEMA), disable_any_whitespace=True)
# Room to spare: the schema bounds everything but whitespace between tokens, which the random
# model picks now and then (outputs here run 40-100 tokens).
MAX_TOKENS = 256
PROMPTS = random_prompts([4, 9, 21], seed=5)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model_dir)))


def sampled(so: StructuredOutputs, n: int, **fields) -> list[SamplingParams]:
    fields = {"max_tokens": MAX_TOKENS, "temperature": 1.0, **fields}
    return [SamplingParams(seed=i, structured_outputs=so, **fields) for i in range(n)]


def each(prompt: list[int], params: list[SamplingParams]):
    """generate()'s arguments for one prompt under each of `params`."""
    return [prompt] * len(params), params


def assert_clean(engine: LLMEngine) -> None:
    assert not engine.has_unfinished()
    engine.check_integrity()
    assert engine.num_free_blocks == engine.block_manager.num_blocks
    assert not engine._grammars and not engine._states


def test_json_schema_50_seeded_samples_all_validate(engine):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(50)]
    outs = engine.generate(prompts, sampled(JSON, 50))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({out.text for out in outs}) > 40  # sampled, not one answer
    assert_clean(engine)


def test_json_object_outputs_are_objects(engine):
    outs = engine.generate(*each(PROMPTS[0], sampled(StructuredOutputs(json_object=True), 12)))
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= 6  # an object may nest or run long: some hit max_tokens
    for out in finished:
        assert isinstance(json.loads(out.text), dict)


def test_regex(engine):
    pattern = r"[a-z]{2,5}@(example|test)\.(com|org)"
    outs = engine.generate(*each(PROMPTS[1], sampled(StructuredOutputs(regex=pattern), 20)))
    for out in outs:
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), out.text


def test_choice_with_characters_that_need_escaping(engine):
    choices = ["yes", "no", 'say "hi"', "back\\slash", "two\nlines", "café ✓"]
    outs = engine.generate(*each(PROMPTS[2], sampled(StructuredOutputs(choice=choices), 30)))
    assert {o.text for o in outs} <= set(choices)
    assert len({o.text for o in outs}) >= 3
    greedy = SamplingParams(temperature=0.0, structured_outputs=StructuredOutputs(choice=choices))
    assert engine.generate(PROMPTS[2], greedy)[0].text in choices


def test_ebnf_grammar(engine):
    grammar = 'root ::= "(" item ("," item)? ")"\nitem ::= [0-9] | "x" [a-c]'
    outs = engine.generate(*each(PROMPTS[0], sampled(StructuredOutputs(grammar=grammar), 20)))
    item = r"([0-9]|x[a-c])"
    for out in outs:
        assert re.fullmatch(rf"\({item}(,{item})?\)", out.text), out.text


def test_disable_any_whitespace_ends_a_greedy_object(engine):
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    loose = engine.generate(PROMPTS[0], SamplingParams(max_tokens=64, structured_outputs=JSON,
                                                       temperature=0.0))[0]  # fmt: skip
    assert loose.finish_reason == "length"  # whitespace forever
    greedy.structured_outputs = COMPACT_JSON
    compact = engine.generate(PROMPTS[0], greedy)[0]
    assert compact.finish_reason == "stop"
    jsonschema.validate(json.loads(compact.text), SCHEMA)
    assert not any(c in compact.text for c in "\n\t\r")


def test_grammar_after_penalties_and_bias_still_holds(engine):
    eos = engine.eos_token_ids[0]
    params = sampled(JSON, 10, presence_penalty=2.0, repetition_penalty=1.5,
                     logit_bias={eos: 100.0, 7: 50.0})  # fmt: skip
    for out in engine.generate(*each(PROMPTS[0], params)):
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_min_tokens_gives_way_when_the_grammar_must_end(engine):
    so = StructuredOutputs(choice=["ok"])
    out = engine.generate(PROMPTS[0], SamplingParams(min_tokens=10, structured_outputs=so))[0]
    assert out.text == "ok" and out.finish_reason == "stop"


def test_grammar_ends_the_request_even_with_ignore_eos(engine):
    so = StructuredOutputs(choice=["done"])
    out = engine.generate(PROMPTS[0], SamplingParams(ignore_eos=True, structured_outputs=so))[0]
    assert out.text == "done" and out.finish_reason == "stop"


@pytest.mark.parametrize(
    "so,message",
    [
        (StructuredOutputs(json='{"type": "nonsense"}'), "structured_outputs.json is not valid"),
        (StructuredOutputs(json='{"type": "integer", "minimum": 5, "maximum": 1}'), "minimum"),
        (StructuredOutputs(regex="(ab"), "structured_outputs.regex is not valid"),
        (StructuredOutputs(grammar="root ::= undefined_rule"), "undefined_rule"),
    ],
)
def test_invalid_grammar_is_a_value_error_at_add_request(engine, so, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", PROMPTS[0], SamplingParams(structured_outputs=so))
    assert_clean(engine)
    engine.generate(PROMPTS[0], SamplingParams(max_tokens=2))  # still serving


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(), "exactly one of json, json_object, regex, choice, grammar; got none"),
        (dict(regex="a", choice=["a"]), r"got \['regex', 'choice'\]"),
        (dict(json="{not json"), "must be a JSON schema as JSON text"),
        (dict(choice=[]), "at least one string"),
        (dict(choice=["a", 1]), "must be a list of strings"),
        (dict(regex=""), "must not be empty"),
        (dict(json_object="yes"), "json_object must be true or false"),
        (dict(json="{}", disable_any_whitespace=1), "disable_any_whitespace must be true or"),
    ],
)
def test_structured_outputs_fields_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputs(**fields)


def test_schema_given_as_an_object_becomes_its_json_text():
    assert StructuredOutputs(json=SCHEMA).json == json.dumps(SCHEMA)


def test_compiled_grammars_are_cached_lru(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    engine.grammars.max_entries = 2
    specs = [StructuredOutputs(regex=f"a{{{n}}}") for n in (1, 2, 3)]
    for spec in [specs[0], specs[1], specs[0]]:
        engine.compile_grammar(SamplingParams(structured_outputs=spec))
    assert engine.grammars.num_compiles == 2
    engine.compile_grammar(SamplingParams(structured_outputs=specs[2]))  # evicts specs[1]
    engine.compile_grammar(SamplingParams(structured_outputs=specs[0]))
    assert engine.grammars.num_compiles == 3 and len(engine.grammars) == 2
    engine.compile_grammar(SamplingParams(structured_outputs=specs[1]))
    assert engine.grammars.num_compiles == 4
    assert COMPACT_JSON.key != JSON.key  # a different grammar


# -- continued elsewhere -----------------------------------------------------------------------


@pytest.mark.parametrize("seeded", [False, True])
def test_decode_role_continues_the_prefills_grammar_state(tiny_model_dir, seeded):
    """The prefill samples token 1 under the grammar; the decode replays it into a fresh
    matcher: the outputs equal colocated ones, and validate."""
    model = str(tiny_model_dir)
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0 if seeded else 0.0,
                             seed=i if seeded else None, structured_outputs=COMPACT_JSON)
              for i in range(len(PROMPTS))]  # fmt: skip
    colocated = LLMEngine(EngineConfig(model=model)).generate(PROMPTS, params)
    prefill = LLMEngine(EngineConfig(model=model, role="prefill"))
    decode = LLMEngine(EngineConfig(model=model, role="decode", cache=CacheConfig(block_size=16)))
    for i, out in enumerate(prefill.generate(PROMPTS, params)):
        dst = decode.add_remote_request(f"d{i}", out.prompt_token_ids, params[i])
        decode.runner.kv_cache[dst] = prefill.runner.kv_cache[out.kv_block_ids]
        prefill.release(out.request_id)
        last = decode.commit_remote(f"d{i}", out.token_ids[0])
        while not last.finished:
            last = next((o for o in decode.step() if o.request_id == f"d{i}"), last)
        assert last.token_ids == colocated[i].token_ids
        jsonschema.validate(json.loads(last.text), SCHEMA)
    assert_clean(decode)


def test_decode_refuses_a_first_token_outside_the_grammar(tiny_model_dir):
    decode = LLMEngine(EngineConfig(model=str(tiny_model_dir), role="decode"))
    params = SamplingParams(structured_outputs=StructuredOutputs(choice=["yes"]))
    assert decode.add_remote_request("r", PROMPTS[0], params) is not None
    not_y = decode.tokenizer.encode("no")[0]
    with pytest.raises(ValueError, match="does not follow the request's grammar"):
        decode.commit_remote("r", not_y)
    assert_clean(decode)


@pytest.mark.parametrize("seeded", [False, True])
def test_resume_continues_from_the_grammar_state(engine, seeded):
    params = SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=1.0 if seeded else 0.0,
        seed=7 if seeded else None,
        structured_outputs=COMPACT_JSON,
    )
    whole = engine.generate(PROMPTS[1], params)[0]
    cut = len(whole.token_ids) // 2
    sent = engine.tokenizer.decode(whole.token_ids[:cut])
    engine.add_request("resumed", PROMPTS[1], params,
                       resume=Resume(tuple(whole.token_ids[:cut]), len(sent)))  # fmt: skip
    text, last = "", None
    while engine.has_unfinished():
        for out in engine.step():
            text += out.delta_text
            last = out
    assert last.token_ids == whole.token_ids
    jsonschema.validate(json.loads(sent + text), SCHEMA)


def test_resume_outside_the_grammar_is_refused(engine):
    params = SamplingParams(structured_outputs=StructuredOutputs(choice=["yes"]))
    bad = engine.tokenizer.encode("no")
    with pytest.raises(ValueError, match="does not follow"):
        engine.add_request("r", PROMPTS[0], params, resume=Resume(tuple(bad[:1]), 0))
    assert_clean(engine)


# -- runners without a model -------------------------------------------------------------------


@pytest.mark.parametrize("runner", ["noop", "emulated"])
def test_runners_without_a_model_follow_the_grammar(tiny_model_dir, runner):
    options = {"model": str(tiny_model_dir), "model_runner": runner}
    if runner == "emulated":
        options["emulation"] = {"hardware": "A100-80GB", "model": "OPT-13B", "time_scale": 1.0}
    engine = LLMEngine(EngineConfig(**options))
    pattern = r"(yes|no) [0-9]{1,3}"
    specs = [StructuredOutputs(regex=pattern), StructuredOutputs(choice=["alpha", "beta"]),
             COMPACT_JSON]  # fmt: skip
    params = [SamplingParams(max_tokens=MAX_TOKENS, structured_outputs=s) for s in specs]
    # No logits: penalties and min_tokens are ignored, logprobs are placeholders (0).
    params.append(SamplingParams(max_tokens=4, presence_penalty=1.0, min_tokens=2,
                                 prompt_logprobs=2))  # fmt: skip
    outs = engine.generate(PROMPTS[:3] + PROMPTS[:1], params)
    assert re.fullmatch(pattern, outs[0].text)
    assert outs[1].text in ("alpha", "beta")
    jsonschema.validate(json.loads(outs[2].text), SCHEMA)
    assert len(outs[3].token_ids) == 4
    assert outs[3].prompt_logprobs == [None] + [(0.0, [])] * (len(PROMPTS[0]) - 1)


@pytest.mark.parametrize("rows", [[0, 2, 4], [0, 1, 2, 3, 4]])
@pytest.mark.parametrize("vocab", [512, 1000, 32000])
def test_row_masks_equal_xgrammars_kernel(vocab, rows):
    """Our CPU masking (an addition of 0 or -inf) gives xgrammar's result, on some rows."""
    words = -(-vocab // 32)
    gen = torch.Generator().manual_seed(vocab)
    masks = torch.randint(-(2**31), 2**31 - 1, (len(rows), words), dtype=torch.int32,
                          generator=gen)  # fmt: skip
    logits = torch.randn(5, vocab, generator=gen)
    ours, theirs = logits.clone(), logits.clone()
    RowMasks(rows, masks).apply(ours)
    full = torch.full((5, words), -1, dtype=torch.int32)
    full[rows] = masks
    xgr.apply_token_bitmask_inplace(theirs, full, indices=rows)
    assert torch.equal(ours, theirs)
    others = [i for i in range(5) if i not in rows]
    assert torch.equal(ours[others], logits[others])


def test_a_token_the_grammar_refuses_fails_that_request_alone(tiny_model_dir):
    """The mask makes it impossible; a runner that breaks it (a fake: there is no real way)
    fails only the request whose grammar refused the token."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    execute = engine.runner.execute
    bad = engine.tokenizer.encode("zzz")[0]

    def corrupt(plan, *args):
        sampled, result = execute(plan, *args)
        for i, request in enumerate(sampled):
            if request.request_id == "victim":
                result.token_ids[i] = bad
        return sampled, result

    engine.runner.execute = corrupt
    so = StructuredOutputs(choice=["yes", "no"])
    engine.add_request("victim", PROMPTS[0], SamplingParams(structured_outputs=so))
    engine.add_request("other", PROMPTS[1], SamplingParams(structured_outputs=so))
    finished, failed = {}, []
    while engine.has_unfinished():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
        failed += engine.take_failed()
    assert [rid for rid, _ in failed] == ["victim"] and "does not follow" in failed[0][1]
    assert finished["other"].text in ("yes", "no")
    assert_clean(engine)
