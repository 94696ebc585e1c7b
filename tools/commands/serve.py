"""`streamspec serve`: an OpenAI-compatible HTTP server over an exported folder.

Runs in the foreground until SIGINT or SIGTERM (uvicorn then finishes the requests in
flight), so a systemd unit can run it as is:

    ExecStart=/opt/streamspec/bin/streamspec serve /opt/models/smollm2-onnx --port 8000
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import socket
import sys
from pathlib import Path

from streamspec.errors import StreamspecError
from streamspec.tools.commands.arguments import integer, text
from streamspec.tools.commands.engine_options import add_engine_arguments, engine_from_args

HELP = ("Serve an exported folder over HTTP with the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health); one model, requests queued and run one at a time.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="a folder written by `streamspec export`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; the loopback default keeps the server local "
                             "(0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=integer(1, 65535), default=8000, help="TCP port to listen on")
    parser.add_argument("--model-name", default=None, type=text,
                        help="the model id that /v1/models reports (default: the folder's name)")
    parser.add_argument("--max-tokens", type=integer(1), default=512,
                        help="the most new tokens one request may ask for (also the chat default)")
    parser.add_argument("--max-prompt-tokens", type=integer(1), default=None,
                        help="the longest prompt accepted, in tokens, below the model's length (default: what the "
                             "model's length allows)")
    parser.add_argument("--max-queue", type=integer(1, 100000), default=64,
                        help="requests waiting or running at once; more are refused with HTTP 429")
    parser.add_argument("--api-key", default=None, type=text,
                        help="require `Authorization: Bearer KEY` on /v1/ (advised with a non-loopback --host); "
                             "the environment variable STREAMSPEC_API_KEY does the same and keeps the key out of "
                             "the process list")
    parser.add_argument("--ar", action="store_true", help="decode autoregressively, never speculate")
    add_engine_arguments(parser)
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                        help="uvicorn's and the server's log level")


def run(args: argparse.Namespace) -> int:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise StreamspecError(f"streamspec serve needs {' and '.join(missing)}: pip install 'streamspec[serve]'.")
    check_port(args.host, args.port)  # before the model loads, so the mistake shows at once
    api_key = args.api_key or os.environ.get("STREAMSPEC_API_KEY") or None

    import logging

    import uvicorn

    from streamspec.runtime.server import ServerSettings, create_app

    engine = engine_from_args(args)
    settings = ServerSettings(model_name=args.model_name or Path(args.folder).resolve().name,
                              max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                              max_queue=args.max_queue, api_key=api_key, speculative=not args.ar)
    settings.check(engine)  # e.g. --max-prompt-tokens beyond the model's length: one sentence, exit 1
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    mode = "speculative" if settings.speculative and engine.can_speculate else "autoregressive"
    print(f"streamspec serve: {settings.model_name} ({mode}, {engine.session.device}, max length "
          f"{engine.max_length}) at http://{_url_host(args.host)}:{args.port}/v1 - batch size 1: requests are "
          f"queued (at most {args.max_queue}) and run one at a time.", file=sys.stderr)
    if not _is_loopback(args.host) and not api_key:
        print("streamspec serve: warning: listening beyond this machine without --api-key; anyone who can reach "
              "the port can use the model.", file=sys.stderr)
    uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def check_port(host: str, port: int) -> None:
    """One sentence when the address cannot be listened on (port in use, unknown host)."""
    if not 0 < port < 65536:
        raise StreamspecError(f"--port must be between 1 and 65535, got {port}.")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise StreamspecError(f"{host} is not an address this machine can listen on.") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except PermissionError:
            raise StreamspecError(f"Port {port} needs privileges on this machine; choose one above 1023.") from None
        except OSError:
            raise StreamspecError(f"Port {port} on {host} is already in use (or {host} is not an address of "
                                  "this machine); stop the other server or choose another --port.") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
