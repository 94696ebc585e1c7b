"""The server against hostile input (issue 15): a clear 4xx, never a 5xx, a crash or a
stall.

- Bodies: one reader counts bytes as they arrive, so a chunked body over the limit is
  a 413 with the server's memory flat, and a chunked body within it is read as usual.
- Prompts: bounded by their length before they are tokenized, and tokenized with the
  GIL released, so /health answers within 100 ms while the largest prompts are handled.
- Requests: strict JSON types ("stream": "yes", a null content), a negative seed and a
  lone surrogate are 400s, streamed or not (never 200 and then an error event).
- The API key is compared in constant time and guards the API's documentation too.
- A property test throws generated request bodies at the server: only 200 or a 4xx in
  OpenAI's error format comes back.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from typing import Iterable, Iterator
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from builders import SHARPEN  # noqa: E402
from helpers import announce_body  # noqa: E402
from streamspec.errors import StreamspecError  # noqa: E402
from streamspec.runtime import Engine  # noqa: E402
from streamspec.runtime import server as server_module  # noqa: E402
from streamspec.runtime.server import ServerSettings, ServerThread, create_app  # noqa: E402

LIMIT = 1 << 20  # the default body limit
PROMPT_LIMIT = 100
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def folder(shared_export):
    """A tiny llama with 3 streams (sharpened weights), shared with other test files:
    read only."""
    return shared_export(sharpen=SHARPEN, max_length=128)


@pytest.fixture(scope="module")
def engine(folder):
    return Engine(folder, provider="cpu")


@pytest.fixture(scope="module")
def server(engine):
    settings = ServerSettings(model_name="tiny", max_tokens=8, max_prompt_tokens=PROMPT_LIMIT)
    with ServerThread(create_app(engine, settings)) as running:
        yield running


# ------------------------------------------------------------------------------ raw HTTP
def request(url: str, method: str, path: str, body: bytes = b"", headers: dict = None) -> tuple[int, bytes]:
    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        connection.request(method, path, body=body or None,
                           headers={"Content-Type": "application/json", **(headers or {})})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def post(url: str, path: str, body: object) -> tuple[int, dict]:
    """POST `body` (bytes as they are, anything else as JSON); (status, JSON answer)
    for a whole answer, (status, {"events": [...]}) for server-sent events."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = request(url, "POST", path, raw)
    if answer.startswith(b"data: "):
        events = [line[6:] for line in answer.decode().split("\n\n") if line.startswith("data: ")]
        return status, {"events": [e if e == "[DONE]" else json.loads(e) for e in events]}
    return status, json.loads(answer)


def assert_refused(status: int, answer: dict, expected_status: int = 400, words: str = "") -> None:
    """A refusal in OpenAI's error format, with one sentence."""
    assert status == expected_status, (status, answer)
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "\n" not in error["message"] and words in error["message"], error["message"]


def send_chunked(url: str, path: str, chunks: Iterable[bytes]) -> tuple[int, dict]:
    """POST with Transfer-Encoding: chunked (no Content-Length to check), stopping as
    soon as the server answers; returns (status, JSON answer)."""
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for chunk in chunks:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if select.select([sock], [], [], 0)[0]:  # an answer before the end of the body
                    break
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection early; its answer is there to read
        return read_answer(sock)


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while True:
        head, _, rest = data.partition(b"\r\n\r\n")
        lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
        if lengths and len(rest) >= lengths[0]:
            break
        try:
            part = sock.recv(1 << 16)
        except ConnectionResetError:
            part = b""
        if not part:
            break
        data += part
    return int(head.split()[1]), json.loads(rest[:lengths[0]])


class PeakMemory:
    """The peak resident memory of this process (client and server threads) above its
    level at the start, sampled every 5 ms."""

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = max(self.peak, _rss()) - self.start


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


# ------------------------------------------------------------------------------ bodies
def test_chunked_body_over_the_limit_is_413_with_memory_flat(server):
    def body() -> Iterator[bytes]:  # a valid JSON start, then 32 MiB of prompt
        yield b'{"prompt": "'
        block = b"a" * (1 << 16)
        for _ in range(32 * (1 << 20) // len(block)):
            yield block

    with PeakMemory() as memory:
        status, answer = send_chunked(server.url, "/v1/completions", body())
    assert status == 413 and f"more than this server's limit of {LIMIT} bytes" in answer["error"]["message"]
    assert memory.growth < 8 << 20, f"the server grew by {memory.growth / 2**20:.1f} MiB for a refused body"
    assert request(server.url, "GET", "/health")[0] == 200


def test_chunked_body_within_the_limit_is_read(server, engine):
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}).encode()
    status, answer = send_chunked(server.url, "/v1/completions", [body[i:i + 5] for i in range(0, len(body), 5)])
    assert status == 200
    assert answer["choices"][0]["text"] == Engine(engine.config.folder, provider="cpu", fallback=False).generate(
        "Once upon a time", max_new_tokens=4).text


def test_announced_body_over_the_limit_is_413(server):
    status, answer = announce_body(server.url, "/v1/completions", LIMIT + 1)
    assert status == 413 and f"is {LIMIT + 1} bytes" in answer["error"]["message"]


# ------------------------------------------------------------------------------ prompts
def health_latencies(url: str, busy: threading.Thread) -> list[float]:
    """GET /health on one connection, again and again while `busy` runs; seconds each."""
    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    latencies = []
    try:
        while busy.is_alive() or len(latencies) < 5:
            start = time.perf_counter()
            connection.request("GET", "/health")
            assert connection.getresponse().read()
            latencies.append(time.perf_counter() - start)
            time.sleep(0.005)
    finally:
        connection.close()
    return latencies


@pytest.mark.parametrize("size", ["length bound", "body limit"])
def test_health_answers_within_100_ms_while_the_largest_prompts_are_handled(server, engine, size):
    """8 clients at once send the largest prompt that reaches the tokenizer (the length
    bound: PROMPT_LIMIT tokens of the vocabulary's longest token), or the largest that
    the body limit lets in (refused by the length bound before any tokenizing: it used
    to be tokenized whole, seconds each with the GIL held, and hundreds of MiB)."""
    chars = PROMPT_LIMIT * engine.tokenizer.longest_token if size == "length bound" else LIMIT - 1024
    answers = []

    def clients() -> None:
        threads = [threading.Thread(target=lambda: answers.append(
            post(server.url, "/v1/completions", {"prompt": "ab" * (chars // 2), "max_tokens": 1})))
            for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    busy = threading.Thread(target=clients)
    with PeakMemory() as memory:
        busy.start()
        latencies = health_latencies(server.url, busy)
        busy.join()
    assert len(answers) == 8
    for status, answer in answers:
        assert_refused(status, answer, words="more than")
        assert answer["error"]["code"] == "context_length_exceeded"
    assert max(latencies) < 0.1, f"/health took up to {max(latencies) * 1000:.0f} ms ({len(latencies)} calls)"
    assert memory.growth < 64 << 20, f"memory grew by {memory.growth / 2**20:.0f} MiB"


def test_tokenizing_a_long_text_releases_the_gil(engine):
    text = "hello world " * 40_000
    gaps, stop = [], threading.Event()

    def ticker() -> None:
        last = time.perf_counter()
        while not stop.wait(0.001):
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.02)
    start = time.perf_counter()
    ids = engine.tokenizer.encode(text)
    took = time.perf_counter() - start
    stop.set()
    thread.join()
    assert len(ids) >= len(text)  # one token per character, and the same ids as a short text's encoding
    assert ids[:24] == engine.tokenizer.encode(text[:24])
    assert max(gaps) < max(0.1, took / 4), f"another thread waited {max(gaps) * 1000:.0f} ms of {took * 1000:.0f}"


def test_prompt_size_bound_in_the_engine(engine):
    longest = engine.tokenizer.longest_token
    with pytest.raises(StreamspecError, match="more than 10 tokens can hold"):
        engine.prompt_ids("a" * (10 * longest + 1), max_tokens=10)
    with pytest.raises(StreamspecError, match="more than 10 tokens can hold"):
        engine.prompt_ids([{"role": "user", "content": "a" * (10 * longest + 1)}], max_tokens=10)
    with pytest.raises(StreamspecError, match="more than the limit of 3"):
        engine.prompt_ids([5, 6, 7, 8], max_tokens=3)
    assert len(engine.prompt_ids("a" * 10, max_tokens=10)) == 10


# ------------------------------------------------------------------------------ request values
MESSAGE = {"role": "user", "content": "Hi!"}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("change, words", [
    ({"seed": -1}, "seed must be an integer between 0 and 2**64 - 1"),
    ({"seed": 2 ** 70}, "seed must be"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "not valid Unicode"),
    ({"stop": ["\udfff"]}, "not valid Unicode"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "Only text message content"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n": "2"}, "n: Input should be a valid integer"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
])
def test_wrong_values_are_400_streamed_or_not(server, change, words, stream):
    body = {"messages": [MESSAGE], "max_tokens": 4, "stream": stream, **change}
    status, answer = post(server.url, CHAT, body)
    assert_refused(status, answer, words=words)


def test_stream_must_be_a_boolean(server):
    status, answer = post(server.url, CHAT, {"messages": [MESSAGE], "stream": "yes"})
    assert_refused(status, answer, words="stream: Input should be a valid boolean")
    status, answer = post(server.url, "/v1/completions", {"prompt": [1.5, 2]})
    assert_refused(status, answer, words="prompt")


@pytest.mark.parametrize("raw", [b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
                                 b'{"prompt": "Hi", "top_p": Infinity}', b"[" * 50_000 + b"]" * 50_000,
                                 b'"just a string"', b"\xff\xfe"])
def test_odd_json_is_400(server, raw):
    path = CHAT if b"messages" in raw else "/v1/completions"
    status, answer = post(server.url, path, raw)
    assert_refused(status, answer)


def test_a_valid_streamed_request_still_streams(server):
    status, answer = post(server.url, CHAT, {"messages": [MESSAGE], "max_tokens": 4, "stream": True, "seed": 3})
    assert status == 200 and answer["events"][-1] == "[DONE]"
    assert not any("error" in event for event in answer["events"][:-1])


# ------------------------------------------------------------------------------ the key and the settings
def test_api_key_compared_in_constant_time_and_guards_the_docs(engine, monkeypatch):
    compared = []
    real = server_module.hmac.compare_digest
    monkeypatch.setattr(server_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    settings = ServerSettings(model_name="tiny", api_key="s3cret")
    with ServerThread(create_app(engine, settings)) as running:
        for path in ("/docs", "/openapi.json", "/redoc", "/v1/models"):
            status, answer = request(running.url, "GET", path)
            assert status == 401 and b"API key" in answer, path
            assert request(running.url, "GET", path, headers={"Authorization": "Bearer s3cre"})[0] == 401
            assert request(running.url, "GET", path, headers={"Authorization": "Bearer s3cret"})[0] == 200, path
        assert request(running.url, "GET", "/health")[0] == 200  # no key needed
        status, answer = request(running.url, "POST", CHAT, json.dumps({"messages": [MESSAGE]}).encode())
        assert status == 401
    assert compared


def test_settings_are_checked_against_the_model(engine):
    with pytest.raises(StreamspecError, match="--max-prompt-tokens must be between 1 and 127"):
        create_app(engine, ServerSettings(max_prompt_tokens=500))
    with pytest.raises(StreamspecError, match="max_queue must be a positive integer"):
        create_app(engine, ServerSettings(max_queue=0))


def test_serve_refuses_a_prompt_limit_beyond_the_model(folder, capsys, monkeypatch):
    import uvicorn

    from streamspec.tools import cli

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: served.append(1))
    monkeypatch.setattr(cli, "COMMANDS", {"serve": "serve"})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert cli.main(["serve", str(folder), "--port", str(free), "--max-prompt-tokens", "4000"]) == 1
    assert "--max-prompt-tokens must be between 1 and 127" in capsys.readouterr().err and not served
    assert cli.main(["serve", str(folder), "--port", "x"]) == 1
    assert "--port must be an integer, got 'x'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ property test
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
TEXT = st.text(max_size=30)
MESSAGE_LIST = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                               "content": TEXT}), min_size=1, max_size=3)
VALID = {  # a valid value for every option
    "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 5), "seed": st.integers(0, 2 ** 64 - 1), "stream": st.booleans(),
    "stop": st.lists(st.text(max_size=3), max_size=4), "n": st.just(1), "logprobs": st.just(False),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "presence_penalty": st.just(0.0),
}
ODD = {  # values just outside each field's range or type (any JSON is tried too)
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["tool", "", "USER"]), "content": TEXT}),
                         max_size=2) | st.just([{"role": "user", "content": None}])
    | st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": SURROGATES}), min_size=1, max_size=1)
    | st.just([{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]),
    "prompt": SURROGATES | st.lists(st.integers(-3, 300), max_size=4) | st.just([[1], [2]]) | st.just(""),
    "max_tokens": st.integers(-2, 0) | st.integers(9, 200), "temperature": st.floats(-2, -0.01),
    "top_p": st.floats(-1, 0) | st.floats(1.0001, 2), "top_k": st.integers(-3, -1),
    "seed": st.integers(-5, -1) | st.integers(2 ** 64, 2 ** 70), "stream": st.sampled_from(["yes", 1, 0, "true"]),
    "stop": st.lists(st.text(max_size=3), min_size=5, max_size=6) | st.lists(SURROGATES, min_size=1, max_size=1),
    "n": st.integers(2, 4), "logprobs": st.just(True), "presence_penalty": st.floats(0.1, 1),
    "echo": st.just(True), "suffix": st.just("x"), "best_of": st.integers(2, 3),
}


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@st.composite
def request_bodies(draw, chat: bool) -> dict:
    """A valid request, then (mostly) one field replaced by an odd value or any JSON."""
    first = {"messages": MESSAGE_LIST} if chat else {"prompt": TEXT.filter(bool) | st.lists(st.integers(0, 127),
                                                                                            min_size=1, max_size=6)}
    body = draw(st.fixed_dictionaries(first, optional=VALID))
    if draw(st.integers(0, 4)):
        key = draw(st.sampled_from(sorted({*first, *VALID, *(() if chat else ("echo", "suffix", "best_of"))})))
        body[key] = draw(ODD.get(key, JSON) | JSON) if key in ODD else draw(JSON)
    return body


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(chat=st.booleans(), data=st.data())
def test_any_request_body_gets_200_or_a_clear_4xx(server, chat, data):
    """Only 200 or a 4xx in OpenAI's error format, and 200 only for values of the right
    JSON types and ranges (strict schema)."""
    body = data.draw(request_bodies(chat))
    status, answer = post(server.url, CHAT if chat else "/v1/completions", json.dumps(body).encode())
    hypothesis.event(f"status {status}")
    if status != 200:
        assert_refused(status, answer, expected_status=status)
        assert 400 <= status < 500, answer
        return
    events = answer.get("events")
    assert (events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])) if events else answer["choices"]
    assert isinstance(body.get("stream", False), bool) and body.get("echo", False) is False
    assert body.get("seed") is None or (is_int(body["seed"]) and 0 <= body["seed"] < 2 ** 64)
    assert body.get("max_tokens") is None or (is_int(body["max_tokens"]) and 1 <= body["max_tokens"] <= 8)
    assert body.get("n", 1) == 1 and isinstance(body.get("stop", []), (str, list, type(None)))
    for message in body.get("messages", []):
        assert isinstance(message["content"], (str, list)) and message["role"] in ("system", "user", "assistant")
