"""The ``bulkhead`` command: run the whole thing or one piece, and manage API keys.

bulkhead up [--host H] [--port P] [--workers N]   everything on this machine
bulkhead gateway|worker|vmhost [--host H] [--port P]   one deployable (multi-host)
bulkhead keys create --name N [--plan P] [--stripe-customer cus_…] [--json]
bulkhead keys list [--json] | revoke ID
bulkhead usage [--key ID] [--month YYYY-MM]           usage table from the ledger
bulkhead migrate                                  create or upgrade the database
bulkhead image build [--template NAME]... [--all] [--for all|qemu|bwrap] | image list|prune
bulkhead doctor                                   which sandbox drivers work here, and why not
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence

from bulkhead.errors import BulkheadError
from bulkhead.settings import CommonSettings, SettingsError


def _logging(name: str) -> None:
    level = os.environ.get("BULKHEAD_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if level != "DEBUG":  # arq logs every job and cron run at INFO
        logging.getLogger("arq").setLevel(logging.WARNING)


def _env_with(**overrides: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in overrides.items():
        if value is not None:
            env["BULKHEAD_" + name] = value
    return env


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.app import run
    from gateway.settings import GatewaySettings

    _logging("gateway")
    port = str(args.port) if args.port is not None else None
    run(GatewaySettings.from_env(_env_with(HOST=args.host, PORT=port)))
    return 0


def cmd_worker(_args: argparse.Namespace) -> int:
    from workers.main import run
    from workers.settings import WorkerSettings

    _logging("worker")
    run(WorkerSettings.from_env())
    return 0


def cmd_vmhost(args: argparse.Namespace) -> int:
    from vmhost.app import run
    from vmhost.errors import ConfigError
    from vmhost.settings import VmhostSettings

    _logging("vmhost")
    from bulkhead.telemetry import setup_tracing

    provider = setup_tracing("vmhost")
    try:
        settings = VmhostSettings.from_env()
    except ConfigError as exc:
        print(f"bulkhead vmhost: configuration error: {exc}", file=sys.stderr)
        return 2
    run(settings, args.host or "127.0.0.1", args.port if args.port is not None else 8700)
    if provider is not None:
        provider.shutdown()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from bulkhead.supervisor import Supervisor

    _logging("up")
    return Supervisor(args.host, args.port, args.workers).run()


def cmd_migrate(_args: argparse.Namespace) -> int:
    from bulkhead.db import Database

    async def go() -> int:
        db = Database(CommonSettings.from_env().database_url)
        try:
            return await db.migrate()
        finally:
            await db.close()

    print(f"database schema version {asyncio.run(go())}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from bulkhead import keys
    from bulkhead.db import Database

    async def go() -> int:
        db = Database(CommonSettings.from_env().database_url)
        try:
            await db.migrate()
            if args.keys_cmd == "create":
                from billing.accounts import create_account_key
                from billing.plans import Plans

                created = await create_account_key(
                    db, Plans.from_env(), args.name, args.plan, args.stripe_customer
                )
                if args.json:
                    print(json.dumps(created.public()))
                else:
                    print(f"id:             {created.key.id}")
                    print(f"api key:        {created.secret}")
                    print(f"webhook secret: {created.key.webhook_secret}")
                    print("Store both now: they are not shown again.")
            elif args.keys_cmd == "list":
                rows = await keys.list_keys(db)
                if args.json:
                    print(json.dumps([r.public() for r in rows]))
                for r in rows if not args.json else []:
                    state = "revoked" if r.revoked_at else "active"
                    print(f"{r.id}  {r.prefix}…  {r.plan:<5} {state:<8} {r.name}")
            else:
                row = await keys.revoke_key(db, args.key_id)
                print(f"revoked {row.id}")
                await _announce()
            return 0
        finally:
            await db.close()

    return asyncio.run(go())


async def _announce() -> None:
    """Make running gateways' key caches re-check every key now (after a revoke)."""
    from redis.asyncio import Redis

    from bulkhead.keys import announce_revocation
    from bulkhead.settings import data_dir, env_opt

    url = env_opt(os.environ, "REDIS_URL")
    state = data_dir(os.environ) / "up.json"
    if url is None and state.exists():
        url = json.loads(state.read_text()).get("redis_url")
    warning = (
        "warning: could not tell running gateways (no BULKHEAD_REDIS_URL and no running "
        "`bulkhead up` here); they refuse the key within 30 s"
    )
    if url is None:
        print(warning, file=sys.stderr)
        return
    redis = Redis.from_url(url)
    try:
        await announce_revocation(redis)
    except OSError:
        print(warning, file=sys.stderr)
    finally:
        await redis.aclose()


def cmd_usage(args: argparse.Namespace) -> int:
    from billing.plans import Plans
    from billing.report_table import usage_table
    from bulkhead.db import Database

    async def go() -> str:
        db = Database(CommonSettings.from_env().database_url)
        try:
            await db.migrate()
            return await usage_table(db, Plans.from_env(), args.key, args.month)
        finally:
            await db.close()

    print(asyncio.run(go()))
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from vmhost.images import cli
    from vmhost.settings import default_image_dir

    image_dir = default_image_dir()
    if args.image_cmd == "list":
        return cli.show(image_dir)
    if args.image_cmd == "prune":
        return cli.prune(image_dir)
    return cli.build(args.template or [], args.all, getattr(args, "for"), image_dir)


def cmd_doctor(_args: argparse.Namespace) -> int:
    from vmhost.doctor import main as doctor

    logging.basicConfig(level=logging.ERROR)  # the report says it all; no driver warnings
    return doctor()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bulkhead", description="Run untrusted code in sandboxes.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run Valkey, gateway, workers and a vmhost on this machine")
    up.add_argument("--host", default=None, help="gateway bind address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="gateway port (default 8080)")
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.set_defaults(fn=cmd_up)

    for name, fn in (("gateway", cmd_gateway), ("vmhost", cmd_vmhost)):
        one = sub.add_parser(name, help=f"run the {name} alone")
        one.add_argument("--host", default=None)
        one.add_argument("--port", type=int, default=None)
        one.set_defaults(fn=fn)
    sub.add_parser("worker", help="run one worker").set_defaults(fn=cmd_worker)
    sub.add_parser("migrate", help="create or upgrade the database").set_defaults(fn=cmd_migrate)

    keys = sub.add_parser("keys", help="manage API keys")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    create = ksub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--plan", default="free", help="a plan from BULKHEAD_PLANS (free|pro)")
    create.add_argument(
        "--stripe-customer", default=None, help="link a Stripe customer (cus_…)"
    )
    create.add_argument("--json", action="store_true")
    lst = ksub.add_parser("list", help="list keys")
    lst.add_argument("--json", action="store_true")
    revoke = ksub.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id")
    keys.set_defaults(fn=cmd_keys)

    use = sub.add_parser("usage", help="sandbox usage per key for a month, as a table")
    use.add_argument("--key", default=None, help="one key id (default: every key)")
    use.add_argument("--month", default=None, help="YYYY-MM (default: this month, UTC)")
    use.set_defaults(fn=cmd_usage)

    image = sub.add_parser("image", help="build and list sandbox template images")
    isub = image.add_subparsers(dest="image_cmd", required=True)
    build = isub.add_parser("build", help="build a template's microVM image and bwrap env")
    build.add_argument("--template", action="append", help="template name (default: base)")
    build.add_argument("--all", action="store_true", help="every template in infra/templates")
    build.add_argument("--for", default="all", choices=("all", "qemu", "bwrap"))
    isub.add_parser("list", help="list built microVM images")
    isub.add_parser("prune", help="delete microVM images that are no template's current one")
    image.set_defaults(fn=cmd_image)
    sub.add_parser("doctor", help="which sandbox drivers work here").set_defaults(fn=cmd_doctor)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except SettingsError as exc:
        print(f"bulkhead: configuration error: {exc}", file=sys.stderr)
        return 2
    except BulkheadError as exc:
        print(f"bulkhead: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
