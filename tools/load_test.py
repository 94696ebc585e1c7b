"""A bounded load test of `streamspec serve` on loopback, with the official `openai` client.

    python -m streamspec.tools.load_test DIR --clients 20 --requests 5 --json load.json
    python -m streamspec.tools.load_test --url http://127.0.0.1:8000 --pid 1234 ...

With DIR it starts `streamspec serve DIR` on a free loopback port in a subprocess (and
stops it after); with --url it uses a running server (--pid: its process, for memory).

1. reference: each distinct prompt once, alone, at temperature 0;
2. load: `clients` threads at once, each sending `requests` chat requests (alternating
   non-streaming and streaming), each answer compared with its reference text and token
   count (greedy decoding is deterministic, so a mixed-up, cut or lost answer shows);
3. figures: requests answered correctly, errors, requests/s, latency p50/p95/max, the
   server's resident memory after the reference pass, after the load and its peak.

Exit code 0 only when every request was answered correctly.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Optional

from streamspec.errors import StreamspecError
from streamspec.files import write_text
from streamspec.tools.harness import MemorySampler

TOPICS = ("owls", "rivers", "prime numbers", "bread", "tides", "chess", "volcanoes", "bees")


@dataclass
class LoadSettings:
    clients: int = 20
    requests: int = 5  # per client
    max_tokens: int = 16
    prompts: int = 8  # distinct prompts, so that requests differ and answers can be told apart


def run_load_test(url: str, settings: LoadSettings, pid: Optional[int] = None) -> dict[str, Any]:
    """Run the test against the server at `url` (pid: its process, for memory figures)."""
    import openai

    base = url.rstrip("/") + "/v1"
    prompts = [[{"role": "user", "content": f"Tell me one fact about {TOPICS[i % len(TOPICS)]} (#{i})."}]
               for i in range(settings.prompts)]
    client = openai.OpenAI(base_url=base, api_key="load-test", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    reference = []
    for messages in prompts:
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=settings.max_tokens,
                                                temperature=0)
        reference.append((answer.choices[0].message.content, answer.usage.completion_tokens))
    # The server's memory after the reference pass, at its peak under the load, and after it.
    memory = MemorySampler(pid, interval=0.2).start() if pid else None
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one_client(index: int) -> None:
        own = openai.OpenAI(base_url=base, api_key="load-test", max_retries=0, timeout=600)
        for j in range(settings.requests):
            which = (index * settings.requests + j) % len(prompts)
            record = _request(own, model, prompts[which], settings.max_tokens, stream=j % 2 == 1,
                              expected=reference[which])
            with lock:
                results.append(record)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(settings.clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if memory is not None:
        memory.stop()
    latencies = sorted(r["seconds"] for r in results)
    expected = settings.clients * settings.requests
    correct = sum(r["correct"] for r in results)
    return dict(
        date=time.strftime("%Y-%m-%d"), url=url, settings=asdict(settings), requests=expected,
        answered=len(results), correct=correct, errors=[r["error"] for r in results if r["error"]][:10],
        seconds=seconds, requests_per_second=len(results) / seconds if seconds else 0.0,
        completion_tokens_per_second=sum(r["tokens"] for r in results) / seconds if seconds else 0.0,
        latency_p50=_quantile(latencies, 0.5), latency_p95=_quantile(latencies, 0.95),
        latency_max=latencies[-1] if latencies else 0.0, rss_before=memory.before if memory else None,
        rss_after=memory.after if memory else None, rss_peak=memory.peak if memory else None,
        passed=correct == expected == len(results))


def _request(client: Any, model: str, messages: list, max_tokens: int, stream: bool,
             expected: tuple[str, int]) -> dict[str, Any]:
    """One request; whether its text and token count equal the reference."""
    start = time.perf_counter()
    try:
        if stream:
            text, tokens = [], 0
            for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            text = "".join(text)
        else:
            answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    temperature=0)
            text, tokens = answer.choices[0].message.content, answer.usage.completion_tokens
        error = None
    except Exception as failure:  # any failure counts as a lost request, with its reason
        text, tokens, error = None, 0, f"{type(failure).__name__}: {failure}"
    return dict(stream=stream, seconds=time.perf_counter() - start, tokens=tokens, error=error,
                correct=error is None and (text, tokens) == expected)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


# ------------------------------------------------------------------------------ command line
def start_server(folder: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`streamspec serve folder` on a free loopback port; returns the process and its URL
    once /health answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "streamspec", "serve", folder, "--port", str(port), "--log-level", "warning",
               *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StreamspecError(f"The server did not start: {(process.stderr.read() or '').strip()[-300:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                if json.load(answer).get("status") == "ok":
                    return process, url
        except OSError:
            time.sleep(0.3)
    process.terminate()
    raise StreamspecError("The server did not answer /health within 300 seconds.")


def _mib(value: Optional[int]) -> str:
    return "n/a" if value is None else f"{value / 2 ** 20:.1f} MiB"


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"streamspec serve load test ({report['settings']['clients']} clients x "
                        f"{report['settings']['requests']} requests, {report['settings']['max_tokens']} tokens)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [("answered correctly", f"{report['correct']} / {report['requests']}"),
            ("errors", str(len(report["errors"]))),
            ("requests/s", f"{report['requests_per_second']:.2f}"),
            ("completion tokens/s", f"{report['completion_tokens_per_second']:.1f}"),
            ("latency p50", f"{report['latency_p50']:.2f} s"), ("latency p95", f"{report['latency_p95']:.2f} s"),
            ("latency max", f"{report['latency_max']:.2f} s"),
            ("server RSS before", _mib(report["rss_before"])), ("server RSS after", _mib(report["rss_after"])),
            ("server RSS peak", _mib(report["rss_peak"]))]
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for error in report["errors"]:
        console.print(f"[red]{error}[/]")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamspec.tools.load_test", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("folder", metavar="DIR", nargs="?", help="an exported folder to serve (or use --url)")
    parser.add_argument("--url", default=None, help="a running server instead of starting one")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's process id, for memory")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=5, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    parser.add_argument("--threads", type=int, default=None, help="the started server's ONNX Runtime threads")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    settings = LoadSettings(clients=args.clients, requests=args.requests, max_tokens=args.max_tokens)
    try:
        if min(args.clients, args.requests, args.max_tokens) < 1:
            raise StreamspecError("--clients, --requests and --max-tokens must be at least 1.")
        if importlib.util.find_spec("openai") is None:
            raise StreamspecError("The load test talks to the server with the openai client: pip install openai.")
        if bool(args.folder) == bool(args.url):
            raise StreamspecError("Pass an exported folder to serve, or --url of a running server (not both).")
        process = None
        if args.folder:
            extra = ["--max-queue", str(max(64, args.clients))] + (["--threads", str(args.threads)]
                                                                   if args.threads else [])
            process, url = start_server(args.folder, extra)
        else:
            url = args.url
        try:
            report = run_load_test(url, settings, process.pid if process else args.pid)
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=60)
    except StreamspecError as error:
        print(f"load_test: {error}", file=sys.stderr)
        return 1
    print_report(report)
    if args.json:
        write_text(args.json, json.dumps(report, indent=2) + "\n")  # atomic: a crash leaves the old file
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
