"""The OpenAI HTTP front end end to end: uvicorn on loopback over a real in-process Router,
driven by the official `openai` client (and raw HTTP where the client would hide the wire).
Greedy output must equal the engine's own (DESIGN.md invariant 3); bad input must be a 400
(invariant 4); a client that goes away must stop its request (invariant 2).
"""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.error
import urllib.request
import uuid
from types import SimpleNamespace

import openai
import pytest

from cluster.engine.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.launch import create_local
from cluster.router.http_server import start_http_server, stop_http_server
from cluster.router.router import Router
from cluster.router.types import RequestFailed
from tests.helpers import LoopThread, wait_until

API_KEY = "sekret-test-key"
PROMPT = "The keeper climbed the steps and"
MESSAGES = [
    {"role": "system", "content": "You keep the lighthouse."},
    {"role": "user", "content": "What did you see tonight?"},
]
MAX_TOKENS = 8
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}


class _StreamWatch:
    """Wraps the real router to see when each request's stream started and how it ended; it
    changes nothing."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self.started: set[str] = set()
        self.ended_early: set[str] = set()

    def __getattr__(self, name):
        return getattr(self._router, name)

    async def generate(self, inp):
        finished = False
        try:
            async for chunk in self._router.generate(inp):
                self.started.add(inp.request_id)
                finished = chunk.finished
                yield chunk
        finally:
            if not finished:
                self.ended_early.add(inp.request_id)


class _FailAfterFirstChunk:
    """A fake, for a failure the in-process router cannot be made to produce on demand: the
    instance is lost mid-decode and the failure policy gives up (RequestFailed)."""

    def __init__(self, router) -> None:
        self._router = router

    def __getattr__(self, name):
        return getattr(self._router, name)

    async def generate(self, inp):
        chunks = self._router.generate(inp)
        try:
            yield await anext(chunks)
            raise RequestFailed("decode instance lost (injected by the test)")
        finally:
            await chunks.aclose()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    loop = LoopThread()
    call = loop.run

    # One request at a time and no queue: a second concurrent request is Overloaded (429).
    local = create_local(model_dir=str(tiny_model_dir), max_in_flight=1, max_queued=0)
    router = _StreamWatch(call(local))
    open_server, open_task, port = call(start_http_server(router, port=0))
    key_server, key_task, key_port = call(start_http_server(router, port=0, api_key=API_KEY))
    yield SimpleNamespace(port=port, key_port=key_port, router=router, call=call)
    call(stop_http_server(open_server, open_task))
    call(stop_http_server(key_server, key_task))
    call(router.shutdown())
    loop.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=60
    )


@pytest.fixture(scope="module")
def model_name(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model_dir)))


def _reference(engine: LLMEngine, prompt, **params):
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **params)
    return engine.generate(prompt, greedy)[0]


def _chat_prompt_ids(engine: LLMEngine) -> list[int]:
    hf = engine.tokenizer.hf
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return hf.encode(text, add_special_tokens=False)


def _http(port: int, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, headers, body bytes) of one raw request; errors are answers too."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


# -- generation ------------------------------------------------------------------------------


def test_models_lists_the_served_model(server, client, model_name):
    assert [m.id for m in client.models.list().data] == [model_name]
    assert model_name == server.router.model_info.name


def test_completion_matches_engine(client, model_name, engine):
    expected = _reference(engine, PROMPT)
    response = client.completions.create(model=model_name, prompt=PROMPT, **GREEDY)
    choice = response.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == MAX_TOKENS
    assert response.usage.total_tokens == len(expected.prompt_token_ids) + MAX_TOKENS


def test_completion_stream_matches_non_stream(client, model_name, engine):
    expected = _reference(engine, PROMPT)
    stream = client.completions.create(
        model=model_name,
        prompt=PROMPT,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    events = list(stream)
    assert "".join(e.choices[0].text for e in events if e.choices) == expected.text
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    usage = events[-1].usage
    assert events[-1].choices == [] and usage.completion_tokens == MAX_TOKENS
    assert usage.prompt_tokens == len(expected.prompt_token_ids)


def test_token_id_prompt_and_logprobs(client, model_name, engine):
    prompt_ids = engine.tokenizer.encode(PROMPT)
    expected = _reference(engine, prompt_ids, logprobs=2)
    response = client.completions.create(model=model_name, prompt=prompt_ids, logprobs=2, **GREEDY)
    logprobs = response.choices[0].logprobs
    assert response.choices[0].text == expected.text
    assert len(logprobs.tokens) == MAX_TOKENS and len(logprobs.top_logprobs) == MAX_TOKENS
    assert logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)


def test_chat_matches_engine(client, model_name, engine):
    prompt_ids = _chat_prompt_ids(engine)
    expected = _reference(engine, prompt_ids)
    response = client.chat.completions.create(model=model_name, messages=MESSAGES, **GREEDY)
    message = response.choices[0].message
    assert message.role == "assistant" and message.content == expected.text
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == MAX_TOKENS


def test_chat_stream_matches_non_stream(client, model_name, engine):
    expected = _reference(engine, _chat_prompt_ids(engine))
    stream = client.chat.completions.create(
        model=model_name, messages=MESSAGES, stream=True, **GREEDY
    )
    events = list(stream)
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == expected.text
    assert events[-1].choices[0].finish_reason == "length"


def test_request_id_header_names_the_response(server, model_name):
    request_id = f"test-{uuid.uuid4().hex}"
    body = json.dumps({"model": model_name, "prompt": PROMPT, "max_tokens": 2}).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    status, response_headers, raw = _http(server.port, "POST", "/v1/completions", body, headers)
    assert status == 200 and json.loads(raw)["id"] == f"cmpl-{request_id}"
    assert response_headers["X-Request-Id"] == request_id


# -- errors ----------------------------------------------------------------------------------


def test_malformed_json_is_a_400(server):
    status, _, raw = _http(server.port, "POST", "/v1/completions", b'{"prompt": "x"', {})
    error = json.loads(raw)["error"]
    assert status == 400 and error["message"].startswith("malformed JSON body: ")
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": PROMPT, "top_p": 2}, "top_p must be in"),
        ({"prompt": PROMPT, "n": 99}, r"n must be in \[1, 16\]"),
        ({"prompt": PROMPT, "top_p": 2, "stream": True}, "top_p must be in"),  # a 400, not SSE
    ],
)
def test_bad_completion_is_a_400(client, model_name, kwargs, message):
    with pytest.raises(openai.BadRequestError, match=message) as info:
        client.completions.create(model=model_name, max_tokens=2, **kwargs)
    assert info.value.status_code == 400


def test_unknown_model_is_a_400(client, model_name):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert f"model 'gpt-4o' is not served here; use '{model_name}'" in str(info.value)
    assert info.value.body["param"] == "model"


def test_unknown_route_is_an_openai_error(server):
    status, _, raw = _http(server.port, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(raw)


def test_overloaded_stream_is_a_429_not_a_stream(server, client, model_name):
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 1500, "stream": True}
    body["ignore_eos"] = True
    with _holding_stream(server, body):  # takes the router's only slot
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2, stream=True)
    assert info.value.status_code == 429 and "capacity" in str(info.value)


def test_error_after_the_first_chunk_travels_in_the_stream(server, model_name):
    failing = _FailAfterFirstChunk(server.router)
    http, task, port = server.call(start_http_server(failing, port=0))
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        failing_client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)
        stream = failing_client.completions.create(
            model=model_name, prompt=PROMPT, stream=True, **GREEDY
        )
        with pytest.raises(openai.APIError, match="decode instance lost"):
            list(stream)
    finally:
        server.call(stop_http_server(http, task))


# -- API key, health, metrics ----------------------------------------------------------------


def test_api_key_is_required_on_v1(server, model_name):
    status, _, raw = _http(server.key_port, "GET", "/v1/models")
    assert status == 401 and json.loads(raw)["error"]["code"] == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert _http(server.key_port, "GET", "/v1/models", headers=wrong)[0] == 401
    base_url = f"http://127.0.0.1:{server.key_port}/v1"
    keyed = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in keyed.models.list().data] == [model_name]
    response = keyed.completions.create(model=model_name, prompt=PROMPT, max_tokens=2)
    assert response.usage.completion_tokens <= 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("port_name", ["port", "key_port"])
def test_health_and_metrics_are_open(server, port_name):
    port = getattr(server, port_name)
    assert _http(port, "GET", "/health")[0] == 200
    status, headers, raw = _http(port, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"# TYPE" in raw


# -- client disconnects ----------------------------------------------------------------------


def _post_raw(port: int, body: dict, request_id: str) -> socket.socket:
    """POST `body` to /v1/completions on a raw socket (so the test decides when it closes)."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: {request_id}\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head + payload)
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> None:
    received = b""
    while marker not in received:
        data = sock.recv(4096)
        assert data, f"connection closed before {marker!r}: {received!r}"
        received += data


@contextlib.contextmanager
def _holding_stream(server, body: dict):
    """A streaming request that runs (first event read) until the block ends; then it is
    dropped, and the block waits for the router to let it go."""
    request_id = f"hold-{uuid.uuid4().hex}"
    with _post_raw(server.port, body, request_id) as sock:
        _read_until(sock, b"data: ")
        yield
    _wait_until_stopped(server, request_id)


def _wait_until_stopped(server, request_id: str) -> None:
    """The router let the request go before it finished."""
    wait_until(
        lambda: request_id in server.router.ended_early,
        timeout_s=15,
        interval_s=0.02,
        message=f"{request_id} still runs",
    )


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_the_request(server, model_name, stream):
    request_id = f"gone-{uuid.uuid4().hex}"
    body = {
        "model": model_name,
        "prompt": PROMPT,
        "max_tokens": 1500,  # far more than the test waits for
        "ignore_eos": True,
        "stream": stream,
    }
    with _post_raw(server.port, body, request_id) as sock:
        if stream:
            _read_until(sock, b"data: ")
        else:  # nothing comes before the end: watch it start generating
            wait_until(lambda: request_id in server.router.started, timeout_s=15)
    _wait_until_stopped(server, request_id)
