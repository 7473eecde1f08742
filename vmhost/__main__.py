"""``python -m vmhost --host 127.0.0.1 --port 8700``"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vmhost.app import run
from vmhost.errors import ConfigError
from vmhost.settings import VmhostSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmhost", description="Bulkhead sandbox host")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        settings = VmhostSettings.from_env(os.environ)
        run(settings, args.host, args.port)
    except ConfigError as exc:
        print(f"vmhost: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
