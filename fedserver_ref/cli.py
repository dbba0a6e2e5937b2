"""``fedserver``: serve one or more job plans over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import sys

from fedclient._exceptions import FedError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedserver`` command."""
    parser = argparse.ArgumentParser(prog="fedserver", description=__doc__)
    parser.add_argument(
        "--plan", action="append", required=True, help="a TOML job plan (repeat for several jobs)"
    )
    parser.add_argument(
        "--db",
        default="fedserver.sqlite",
        help="SQLite database; a restarted server resumes from it",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--tick-seconds", type=float, default=1.0, help="how often deadlines are checked"
    )
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--identity-authority",
        action="append",
        default=[],
        metavar="HEX",
        help="an identity authority's public key (64 hex digits; repeat for several): "
        "devices enrol only with an identity key it certified (fedclient.IdentityAuthority)",
    )
    args = parser.parse_args(argv)
    try:
        authorities = tuple(bytes.fromhex(key) for key in args.identity_authority)
    except ValueError:
        authorities = ()
    if any(len(key) != 32 for key in authorities) or len(authorities) != len(
        args.identity_authority
    ):
        print("fedserver: --identity-authority takes 64 hex digits", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from fedserver_ref import FederationService, ServerStore, create_app, load_plan

        service = FederationService(ServerStore(args.db), identity_authorities=authorities)
        for path in args.plan:
            service.add_job(load_plan(path))
    except ImportError as exc:
        print(
            f"fedserver needs the server extra: pip install 'fedclient[server]' ({exc})",
            file=sys.stderr,
        )
        return 2
    except FedError as exc:
        print(f"fedserver: {exc}", file=sys.stderr)
        return exc.exit_code
    app = create_app(service, tick_seconds=args.tick_seconds)
    print(
        f"fedserver: serving {', '.join(j.name for j in service.store.jobs())} on "
        f"http://{args.host}:{args.port} (db {args.db})",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
