"""The OpenAI-compatible server, through the official `openai` client on 127.0.0.1.

uvicorn serves the app in a background thread on a free loopback port; every check is
what a client sees: answers equal to the engine's own greedy output, streamed deltas
that add up to the non-streamed text, usage counts, the errors of refused requests (a
400 with one sentence, never a crash), a full queue (429), and a small load test.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from builders import SHARPEN  # noqa: E402
from helpers import announce_body  # noqa: E402
from streamspec.runtime import Engine  # noqa: E402
from streamspec.runtime.server import Job, ServerSettings, ServerThread, create_app  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! Who are you?"}]


@pytest.fixture(scope="module")
def folder(shared_export):
    """A tiny llama with 3 streams whose greedy text varies (sharpened weights); shared
    with other test files: read only."""
    return shared_export(sharpen=SHARPEN, max_length=128)


@pytest.fixture(scope="module")
def reference(folder):
    return Engine(folder, provider="cpu", fallback=False)


@pytest.fixture(scope="module")
def server(folder):
    settings = ServerSettings(model_name="tiny", max_tokens=48, max_prompt_tokens=100)
    with ServerThread(create_app(Engine(folder, provider="cpu"), settings)) as running:
        yield running


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.load(answer)


def post_raw(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


# ------------------------------------------------------------------------------ answers
def test_chat_completion_streaming_equals_non_streaming(client, reference):
    expected = reference.generate(MESSAGES, max_new_tokens=24)
    assert client.models.list().data[0].id == "tiny"
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == ("length" if expected.stats.stop_reason == "length" else "stop")
    prompt_tokens = len(reference.prompt_ids(MESSAGES))
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, len(expected.token_ids))
    assert usage.total_tokens == prompt_tokens + len(expected.token_ids)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"

    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert deltas == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]
    streamed_usage = chunks[-1].usage
    assert (streamed_usage.prompt_tokens, streamed_usage.completion_tokens) == (usage.prompt_tokens,
                                                                                usage.completion_tokens)
    # The same prompt again: its rows were still in the cache, all but the last token.
    assert streamed_usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1


def test_chat_history_reuses_the_cache_turn_after_turn(client, reference):
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    history = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                          {"role": "user", "content": "Tell me more."}]
    second = client.chat.completions.create(model="tiny", messages=history, max_tokens=10, temperature=0)
    assert second.choices[0].message.content == reference.generate(history, max_new_tokens=10).text
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.streamspec["cached_tokens"] == second.usage.prompt_tokens_details.cached_tokens  # extra field


def test_completions_text_and_token_prompts(client, reference):
    text = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0)
    expected = reference.generate("Once upon a time", max_new_tokens=16)  # OpenAI's default max_tokens
    assert text.choices[0].text == expected.text and text.usage.completion_tokens == len(expected.token_ids)
    ids = [5, 40, 41, 42, 9, 77]
    streamed = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == \
        reference.generate(ids, max_new_tokens=12).text
    sampled = [client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0.9, seed=5)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1] == reference.generate(ids, max_new_tokens=8, temperature=0.9, seed=5).text


# ------------------------------------------------------------------------------ refusals
def test_errors_a_client_sees(client, server):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 200}], max_tokens=4)
    assert refused.value.status_code == 400 and refused.value.code == "context_length_exceeded"
    assert "The prompt has" in refused.value.message and "limit of 100" in refused.value.message
    with pytest.raises(openai.BadRequestError, match="max_tokens is 500, more than this server's limit of 48"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="beyond the model's maximum context length of 128"):
        client.completions.create(model="tiny", prompt="y" * 90, max_tokens=48)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="tiny", prompt="")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")

    status, body = post_raw(server.url + "/v1/chat/completions", b'{"model": "tiny"}')
    assert status == 400 and body["error"]["message"].startswith("Invalid request (messages: Field required")
    status, body = post_raw(server.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = announce_body(server.url, "/v1/completions", 2 << 20)
    assert status == 413 and "more than this server's limit" in body["error"]["message"]
    status, body = post_raw(server.url + "/v1/nowhere", b"{}")
    assert status == 404 and "error" in body
    assert get_json(server.url + "/health")["status"] == "ok"  # still serving


def test_full_queue_is_429_and_the_queued_request_still_completes(folder, monkeypatch):
    release, started = threading.Event(), threading.Event()
    run = Job.run

    def held_run(job, engine):  # the first request holds the engine until released
        started.set()
        release.wait(30)
        return run(job, engine)

    monkeypatch.setattr(Job, "run", held_run)
    settings = ServerSettings(model_name="tiny", max_queue=1)
    with ServerThread(create_app(Engine(folder, provider="cpu"), settings)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        answers = []
        first = threading.Thread(target=lambda: answers.append(client.completions.create(
            model="tiny", prompt="ab", max_tokens=4, temperature=0)))
        first.start()
        assert started.wait(30)
        assert get_json(server.url + "/health")["queue"] == 1
        with pytest.raises(openai.RateLimitError, match="The server is busy"):
            client.completions.create(model="tiny", prompt="cd", max_tokens=4)
        release.set()
        first.join(30)
        assert len(answers) == 1 and answers[0].usage.completion_tokens == 4


def test_api_key_when_set(folder):
    settings = ServerSettings(model_name="tiny", api_key="secret")
    with ServerThread(create_app(Engine(folder, provider="cpu"), settings)) as server:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=server.url + "/v1", api_key="secret").models.list().data[0].id == "tiny"
        assert get_json(server.url + "/health")["status"] == "ok"  # health needs no key


def test_client_leaving_a_stream_frees_the_engine(client, server, reference):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=48, temperature=0,
                                            stream=True)
    next(iter(stream))
    stream.close()
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == reference.generate(MESSAGES, max_new_tokens=8).text
    assert get_json(server.url + "/health")["queue"] == 0


def test_health_and_model_card(server):
    health = get_json(server.url + "/health")
    assert health["batch_size"] == 1 and health["max_length"] == 128 and health["speculative"] is True
    assert set(health["fallback"]) >= {"mode", "speculative_tokens_per_second", "autoregressive_tokens_per_second"}
    assert get_json(server.url + "/v1/models/tiny")["id"] == "tiny"


# ------------------------------------------------------------------------------ load and the command
def test_small_load_test(server):
    from streamspec.tools.load_test import LoadSettings, run_load_test

    report = run_load_test(server.url, LoadSettings(clients=4, requests=3, max_tokens=8, prompts=3), os.getpid())
    assert report["passed"] and report["answered"] == report["correct"] == 12 and not report["errors"]
    assert report["rss_before"] > 0 and report["latency_p95"] >= report["latency_p50"] > 0


def test_serve_command_bad_input(folder, tmp_path, capsys, monkeypatch):
    from streamspec.tools import cli

    monkeypatch.setattr(cli, "COMMANDS", {"serve": "serve"})  # only this command
    assert cli.main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 1
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(folder), "--port", str(port)]) == 1
        assert "already in use" in capsys.readouterr().err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert cli.main(["serve", str(tmp_path / "missing"), "--port", str(free)]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["serve", str(folder), "--max-tokens", "0"]) == 1
    assert "--max-tokens must be at least 1" in capsys.readouterr().err
