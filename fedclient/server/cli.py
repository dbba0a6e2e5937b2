"""``fedserver``: serve one or more job plans over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from fedclient._exceptions import FedError, InvalidInput, StateError
from fedclient.server.database import redacted

__all__ = ["main", "worker_app"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedserver`` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["init"]:
        return _init(argv[1:])
    if argv[:1] == ["backup"]:
        return _backup(argv[1:])
    if argv[:1] == ["admin"]:
        from fedclient.server.admin import main as admin

        return admin(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    authorities = _authorities(args.identity_authority)
    if authorities is None:
        return 2
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        print("fedserver: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("fedserver: --workers takes a number >= 1", file=sys.stderr)
        return 2
    built = _build(args, authorities)
    if isinstance(built, int):
        return built
    app, service, policy = built
    if policy.kind == "open":
        print(
            "fedserver: enrolment is open: anyone can enrol devices "
            "(--enrolment-secret-file or --enrolment-codes to close it)",
            file=sys.stderr,
        )
    if args.header_timeout <= 0 or args.max_connections < 0:
        print(
            "fedserver: --header-timeout takes seconds > 0, --max-connections N >= 1",
            file=sys.stderr,
        )
        return 2
    _more_descriptors()
    limits = _connection_limits(args)
    scheme = "https" if args.ssl_certfile else "http"
    where = redacted(service.store.url)
    jobs = ", ".join(j.name for j in service.store.jobs())
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    print(
        f"fedserver: serving {jobs} on {scheme}://{args.host}:{args.port} (db {where}{workers};"
        f" at most {limits.cap()} connections, headers within {limits.header_seconds:g} s)"
    )
    sys.stdout.flush()
    import uvicorn

    from fedclient.server.connections import protocol

    options: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "ssl_certfile": args.ssl_certfile,
        "ssl_keyfile": args.ssl_keyfile,
        "http": protocol(),
    }
    if args.workers == 1:
        uvicorn.run(app, **options)
        return 0
    # Each worker process builds its own app (and database connection) from the same
    # command line: checked once here, so a worker cannot fail where this did not.
    service.store.close()
    os.environ[_WORKER_ARGV] = json.dumps(argv)
    uvicorn.run("fedclient.server.cli:worker_app", factory=True, workers=args.workers, **options)
    return 0


#: The environment variable that hands a worker process the server's command line.
_WORKER_ARGV = "FEDSERVER_WORKER_ARGV"


def worker_app() -> Any:
    """The app of one worker process of ``fedserver --workers N`` (a uvicorn factory)."""
    argv = json.loads(os.environ[_WORKER_ARGV])
    parser = _parser()
    args = parser.parse_args(argv)
    _connection_limits(args)  # this process accepts its own connections
    built = _build(args, _authorities(args.identity_authority) or ())
    if isinstance(built, int):
        raise SystemExit(built)
    return built[0]


def _connection_limits(args: argparse.Namespace) -> Any:
    """Set the header deadline and the connection cap of this process's connections."""
    from fedclient.server.connections import ConnectionLimits, configure

    limits = ConnectionLimits(args.header_timeout, args.max_connections)
    configure(limits)
    return limits


def _more_descriptors() -> None:
    """Raise the soft limit of open files to the hard one (as Go's runtime does): each
    connection takes one, and the cap on connections is half of them."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _build(args: argparse.Namespace, authorities: tuple[bytes, ...]) -> tuple[Any, Any, Any] | int:
    """The app, its service and its enrolment policy, or an exit code (after saying why)."""
    try:
        from fedclient.server import FederationService, create_app, load_plan
        from fedclient.server.auth import EnrolmentPolicy
        from fedclient.server.integrity import open_served
        from fedclient.server.limits import RateLimits

        limits = None if args.no_rate_limits else RateLimits.parse(args.rate_limits)
        plans = [load_plan(path) for path in args.plan]
        admin_token = _read_secret(args.admin_token_file, "admin token", 32)
        policy = EnrolmentPolicy.open()
        if args.enrolment_secret_file:
            policy = EnrolmentPolicy.secret(
                _read_secret(args.enrolment_secret_file, "enrolment secret", 16) or ""
            )
        elif args.enrolment_codes:
            policy = EnrolmentPolicy.codes()
        service = FederationService(
            open_served(args.db, bodies=args.bodies),
            identity_authorities=authorities,
            enrolment=policy,
            admin_token=admin_token,
            public_status=args.public_status,
            metrics_token=_read_secret(args.metrics_token_file, "metrics token", 16),
            public_metrics=args.public_metrics,
        )
        for plan in plans:
            service.add_job(plan)
        if args.bodies is not None and not service.store.shared:
            raise StateError(
                "--bodies is for PostgreSQL's workers: a SQLite file keeps its update"
                " bodies in a folder beside it"
            )
        service.store.spool_bodies(args.bodies)
    except ImportError as exc:
        print(
            f"fedserver needs the server extra: pip install 'fedclient[server]' ({exc})",
            file=sys.stderr,
        )
        return 2
    except FedError as exc:
        print(f"fedserver: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.workers > 1 and not service.store.shared:
        print(
            "fedserver: several workers share a PostgreSQL database only: "
            "--db postgresql://... (a SQLite file has one writer)",
            file=sys.stderr,
        )
        return 2
    app = create_app(service, tick_seconds=args.tick_seconds, rate_limits=limits)
    return app, service, policy


def _parser() -> argparse.ArgumentParser:
    """``fedserver``'s options."""
    parser = argparse.ArgumentParser(
        prog="fedserver",
        description=__doc__,
        epilog="fedserver init --plan PLAN --db PATH creates the database first; "
        "fedserver backup --db PATH DEST copies it while it serves; "
        "fedserver admin ... runs the operator's commands.",
    )
    parser.add_argument(
        "--plan", action="append", required=True, help="a TOML job plan (repeat for several jobs)"
    )
    parser.add_argument(
        "--db",
        default="fedserver.sqlite",
        help="the database made by `fedserver init`: a SQLite file (or sqlite:///PATH), or "
        "postgresql://USER@HOST/NAME; a restarted server resumes from it",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes serving the port (more than one needs a PostgreSQL --db)",
    )
    parser.add_argument(
        "--bodies",
        metavar="DIR",
        help="PostgreSQL: keep update bodies in files under DIR, which every worker shares "
        "(a shared mount across hosts), instead of in the database's rows: 2x the uploads "
        "a second (README, Sizing)",
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
    parser.add_argument(
        "--admin-token-file",
        help="a file holding the admin token: enables the admin API (fedserver admin ...)",
    )
    parser.add_argument(
        "--public-status",
        action="store_true",
        help="serve job and round status without a token (default: a device's or the admin's)",
    )
    metrics = parser.add_mutually_exclusive_group()
    metrics.add_argument(
        "--metrics-token-file",
        help="a file holding a token that reads /metrics only (Prometheus: authorization "
        "credentials_file); the admin token reads it too",
    )
    metrics.add_argument(
        "--public-metrics",
        action="store_true",
        help="serve /metrics without a token (default: the metrics or the admin token)",
    )
    enrolment = parser.add_mutually_exclusive_group()
    enrolment.add_argument(
        "--enrolment-secret-file",
        help="devices enrol only with this secret (Client(enrolment_credential=...))",
    )
    enrolment.add_argument(
        "--enrolment-codes",
        action="store_true",
        help="devices enrol only with a single-use code (fedserver admin codes N)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="close a connection whose request headers are not complete this long after it "
        "opened or its last answer (a stalled client cannot hold it; default 30)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=0,
        metavar="N",
        help="at most N open connections; one more closes the one that waited longest for "
        "its headers (default: half the open-file limit beyond 64)",
    )
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", help="...and this private key (PEM)")
    _authority_option(parser)
    return parser


def _read_secret(path: str | None, what: str, least: int) -> str | None:
    """The secret in file ``path`` (surrounding whitespace dropped), or None without one."""
    if path is None:
        return None
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise InvalidInput(f"cannot read the {what} file {path}: {exc}") from None
    if len(secret) < least:
        raise InvalidInput(f"the {what} in {path} has fewer than {least} characters")
    return secret


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
        from fedclient.server.plan import load_plan
        from fedclient.server.service import FederationService
        from fedclient.server.store import ServerStore

        plans = [load_plan(path) for path in args.plan]
        store = ServerStore.create(args.db)
        service = FederationService(store)
        for plan in plans:
            service.add_job(plan)
        store.close()
    except FedError as exc:
        print(f"fedserver init: {exc}", file=sys.stderr)
        return exc.exit_code
    names = ", ".join(p.job.name for p in plans)
    print(f"fedserver init: created {redacted(args.db)} with {names}")
    return 0


def _backup(argv: list[str]) -> int:
    """``fedserver backup``: a consistent copy of a served database (`fedclient.server.
    backup`)."""
    parser = argparse.ArgumentParser(
        prog="fedserver backup",
        description="Copy a server database while it serves: a SQLite file with its open "
        "rounds' update bodies (DEST and DEST.bodies), or a PostgreSQL database (pg_dump's "
        "custom format; with --bodies, its workers' body files to DEST.bodies). Restore by "
        "serving the copy: fedserver --db DEST (SQLite), or pg_restore into an empty "
        "database (PostgreSQL; served with --bodies DEST.bodies if it had them).",
    )
    parser.add_argument("--db", required=True, help="the database the server serves")
    parser.add_argument(
        "--bodies",
        metavar="DIR",
        help="PostgreSQL: the folder its workers keep update bodies in (fedserver --bodies);"
        " copied to DEST.bodies",
    )
    parser.add_argument("dest", help="the new copy (never written over)")
    args = parser.parse_args(argv)
    from fedclient.server.backup import backup

    try:
        copied = backup(args.db, args.dest, bodies=args.bodies)
    except FedError as exc:
        print(f"fedserver backup: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"fedserver backup: cannot write {args.dest}: {exc}", file=sys.stderr)
        return 1
    bodies = (
        f" and the update bodies of {copied.rounds} open rounds ({copied.body_bytes:,} bytes)"
        if copied.rounds
        else ""
    )
    print(
        f"fedserver backup: copied {redacted(str(args.db))} ({copied.database_bytes:,} bytes)"
        f"{bodies} to {copied.dest}"
    )
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
