"""``fs-cc360``: the operator's command line (presentation only, like rq's ``cli/``).

Each command group lives in its own module and registers itself here; commands read and
change the outbox only through :mod:`fs_cc360.outbox`. Exit codes: 0 ok, 1 something to
look at (dead rows, a failed check), 2 usage or configuration error.
"""

from __future__ import annotations

# The service is a gevent program: sockets, ssl, threads and time must be cooperative
# before requests/urllib3 and friends import them. Harmless for the one-shot commands.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from fs_cc360 import __version__  # noqa: E402
from fs_cc360.cli import backfill_cmds, crm_cmds, outbox_cmds, service_cmds  # noqa: E402
from fs_cc360.cli.common import EXIT_CONFIG, EXIT_PROBLEM, setup_logging  # noqa: E402
from fs_cc360.errors import ConfigError, FsCc360Error  # noqa: E402

COMMAND_MODULES = (service_cmds, outbox_cmds, crm_cmds, backfill_cmds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fs-cc360",
        description="FreeSWITCH to CC360 connector: popups, call history, click-to-call.",
    )
    parser.add_argument("--version", action="version", version=f"fs-cc360 {__version__}")
    parser.add_argument(
        "-c", "--config", metavar="FILE", default=os.environ.get("FS_CC360_CONFIG"),
        help="INI configuration file (default: $FS_CC360_CONFIG; none: defaults + env)",
    )
    parser.add_argument(
        "--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default=None,
        help="override [logging] level",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level or "WARNING")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"fs-cc360: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except FsCc360Error as exc:
        print(f"fs-cc360: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
