"""``python -m billing.fake_stripe [--host H] [--port N] [--secret-key sk_test_…]``."""

from __future__ import annotations

import argparse
import asyncio
import signal

from .server import FakeStripe


async def serve(host: str, port: int, secret_key: str | None) -> None:
    fake = FakeStripe(secret_key)
    url = await fake.start(host, port)
    print(f"fake Stripe listening on {url}", flush=True)
    print(f"secret key: {fake.secret_key}", flush=True)
    print(
        f'use: stripe.StripeClient("{fake.secret_key}", '
        f'base_addresses={{"api": "{url}", "meter_events": "{url}"}})',
        flush=True,
    )
    print(f"inspect: {url}/_fake/summary  {url}/_fake/meter_events  {url}/_fake/requests")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m billing.fake_stripe", description="Run the fake Stripe API server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    parser.add_argument("--secret-key", default=None, help="default: a fresh sk_test_ key")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.secret_key))


if __name__ == "__main__":
    main()
