"""``fedserver``: serve one or more job plans over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import sys

from fedclient._exceptions import FedError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedserver`` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["init"]:
        return _init(argv[1:])
    parser = argparse.ArgumentParser(
        prog="fedserver",
        description=__doc__,
        epilog="fedserver init --plan PLAN --db PATH creates the database first.",
    )
    parser.add_argument(
        "--plan", action="append", required=True, help="a TOML job plan (repeat for several jobs)"
    )
    parser.add_argument(
        "--db",
        default="fedserver.sqlite",
        help="SQLite database made by `fedserver init`; a restarted server resumes from it",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--tick-seconds", type=float, default=1.0, help="how often deadlines are checked"
    )
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--rate-limits",
        default="",
        metavar="NAME=N/PERIOD,...",
        help="change rate limits (enrol, checkin_per_address, checkin_per_device, "
        "upload_per_address, upload_per_device; defaults 60, 1200, 30, 1200, 30 a minute)",
    )
    parser.add_argument(
        "--no-rate-limits", action="store_true", help="answer every request (a test bench)"
    )
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", help="...and this private key (PEM)")
    _authority_option(parser)
    args = parser.parse_args(argv)
    authorities = _authorities(args.identity_authority)
    if authorities is None:
        return 2
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        print("fedserver: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from fedserver_ref import FederationService, ServerStore, create_app, load_plan
        from fedserver_ref.limits import RateLimits

        limits = None if args.no_rate_limits else RateLimits.parse(args.rate_limits)
        plans = [load_plan(path) for path in args.plan]
        service = FederationService(
            ServerStore.open_existing(args.db), identity_authorities=authorities
        )
        for plan in plans:
            service.add_job(plan)
    except ImportError as exc:
        print(
            f"fedserver needs the server extra: pip install 'fedclient[server]' ({exc})",
            file=sys.stderr,
        )
        return 2
    except FedError as exc:
        print(f"fedserver: {exc}", file=sys.stderr)
        return exc.exit_code
    app = create_app(service, tick_seconds=args.tick_seconds, rate_limits=limits)
    scheme = "https" if args.ssl_certfile else "http"
    print(
        f"fedserver: serving {', '.join(j.name for j in service.store.jobs())} on "
        f"{scheme}://{args.host}:{args.port} (db {args.db})",
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    return 0


def _init(argv: list[str]) -> int:
    """``fedserver init``: create the database and its jobs (the only way one is made)."""
    parser = argparse.ArgumentParser(
        prog="fedserver init",
        description="Create a server database with the jobs of the given plans. It refuses "
        "to touch an existing file; `fedserver` then serves the database.",
    )
    parser.add_argument("--plan", action="append", required=True, help="a TOML job plan")
    parser.add_argument("--db", default="fedserver.sqlite", help="where to create it")
    args = parser.parse_args(argv)
    try:
        from fedserver_ref.plan import load_plan
        from fedserver_ref.service import FederationService
        from fedserver_ref.store import ServerStore

        plans = [load_plan(path) for path in args.plan]
        store = ServerStore.create(args.db)
        service = FederationService(store)
        for plan in plans:
            service.add_job(plan)
        store.close()
    except FedError as exc:
        print(f"fedserver init: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"fedserver init: created {args.db} with {', '.join(p.job.name for p in plans)}")
    return 0


def _authority_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--identity-authority",
        action="append",
        default=[],
        metavar="HEX",
        help="an identity authority's public key (64 hex digits; repeat for several): "
        "devices enrol only with an identity key it certified (fedclient.IdentityAuthority)",
    )


def _authorities(keys: list[str]) -> tuple[bytes, ...] | None:
    """The authorities' public keys, or None (after saying why) if one is malformed."""
    try:
        parsed = tuple(bytes.fromhex(key) for key in keys)
    except ValueError:
        parsed = ()
    if len(parsed) != len(keys) or any(len(key) != 32 for key in parsed):
        print("fedserver: --identity-authority takes 64 hex digits", file=sys.stderr)
        return None
    return parsed


if __name__ == "__main__":
    raise SystemExit(main())
