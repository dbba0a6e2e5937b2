"""``fedserver admin``: the operator's commands, over the admin API of a running server.

    fedserver admin --url https://fl.example.com --token-file admin.token pause digits
    fedserver admin ... resume digits | stop digits | status digits
    fedserver admin ... rounds digits | devices digits
    fedserver admin ... revoke d-0123abcd
    fedserver admin ... codes 100                 # single-use enrolment codes
    fedserver admin ... create-job plan.toml

The token is read from a file (or ``$FEDSERVER_ADMIN_TOKEN``), never from the
command line, where other users of the machine could see it; ``--ca-bundle`` verifies
a server whose certificate a private CA signed. Answers print as JSON; errors print
in one line with a non-zero exit (a reader that stops early, as ``| head`` does, ends
it without a traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec

from fedclient._exceptions import FedError, InvalidInput
from fedclient.protocol import (
    ADMIN_CODES,
    ADMIN_CREATE_JOB,
    ADMIN_DEVICES,
    ADMIN_JOB_ACTION,
    ADMIN_REVOKE,
    ADMIN_ROUNDS,
    JOB_STATUS,
    IssueCodes,
    Route,
)
from fedclient.transport import raise_for_error, ssl_context

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedserver admin``."""
    parser = argparse.ArgumentParser(prog="fedserver admin", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL")
    parser.add_argument(
        "--token-file", help="file holding the admin token (default: $FEDSERVER_ADMIN_TOKEN)"
    )
    parser.add_argument("--ca-bundle", help="CA bundle that verifies the server's certificate")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("pause", "resume", "stop", "status", "rounds", "devices"):
        commands.add_parser(name).add_argument("job")
    commands.add_parser("revoke").add_argument("device")
    commands.add_parser("codes").add_argument("count", type=int)
    commands.add_parser("create-job").add_argument("plan")
    args = parser.parse_args(argv)
    try:
        token = _token(args.token_file)
        with httpx.Client(
            base_url=args.url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            verify=ssl_context(args.ca_bundle or True),
            timeout=30.0,
        ) as http:
            answer = _run(http, args)
    except FedError as exc:
        print(f"fedserver admin: {exc}", file=sys.stderr)
        return exc.exit_code
    except httpx.HTTPError as exc:
        print(f"fedserver admin: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    try:
        print(msgspec.json.format(msgspec.json.encode(answer), indent=2).decode())
        sys.stdout.flush()
    except BrokenPipeError:
        # `fedserver admin ... | head`: the reader had enough. No traceback, and none
        # again when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _token(path: str | None) -> str:
    if path is not None:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc}") from None
    token = os.environ.get("FEDSERVER_ADMIN_TOKEN", "")
    if not token:
        raise InvalidInput("give --token-file or set FEDSERVER_ADMIN_TOKEN")
    return token


def _run(http: httpx.Client, args: argparse.Namespace) -> Any:
    command = args.command
    if command in ("pause", "resume", "stop"):
        return _call(http, ADMIN_JOB_ACTION, job=args.job, action=command)
    if command == "status":
        return _call(http, JOB_STATUS, job=args.job)
    if command == "rounds":
        return _call(http, ADMIN_ROUNDS, job=args.job)
    if command == "devices":
        return _call(http, ADMIN_DEVICES, job=args.job)
    if command == "revoke":
        return _call(http, ADMIN_REVOKE, device=args.device)
    if command == "codes":
        return _call(http, ADMIN_CODES, body=IssueCodes(args.count))
    from fedclient.server.plan import load_plan

    return _call(http, ADMIN_CREATE_JOB, body=load_plan(args.plan))


def _call(http: httpx.Client, route: Route, body: Any = None, **params: str) -> Any:
    content = msgspec.json.encode(body) if body is not None else None
    headers = {"Content-Type": "application/json"} if content is not None else None
    response = http.request(route.method, route.url(**params), content=content, headers=headers)
    raise_for_error(response)
    return response.json()
