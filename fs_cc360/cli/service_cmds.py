"""``run``, ``check-config`` and ``demo``: the service itself and its start-up check."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fs_cc360.cli.common import EXIT_OK, load, print_json, setup_logging
from fs_cc360.config import secret_keys


def register(sub: Any) -> None:
    run = sub.add_parser("run", help="run the connector until SIGTERM/SIGINT")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check-config", help="validate the configuration and print the effective settings")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--draft", action="store_true",
                       help="accept a config without CRM URL/credentials/token (a draft)")
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser(
        "demo", help="run the whole pipeline against a simulated FreeSWITCH and CRM")
    demo.add_argument("--calls", type=int, default=2,
                      help="how many times to replay the set of demo calls (default 2)")
    demo.add_argument("--outage", type=float, default=4.0,
                      help="seconds the simulated CRM is down in the middle (0: none)")
    demo.add_argument("--quiet", action="store_true", help="only the final summary")
    demo.set_defaults(func=cmd_demo)


def cmd_run(args: argparse.Namespace) -> int:
    from fs_cc360 import service

    settings = load(args)
    setup_logging(args.log_level or settings.logging.level, settings.logging.format,
                  stream=sys.stdout)
    return service.run(settings)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = load(args, require_crm=not args.draft)
    dump = settings.dump(masked=True)
    sources = settings.dump_sources()
    if args.json:
        print_json({"ok": True, "file": args.config, "settings": dump, "sources": sources,
                    "secrets": secret_keys()})
        return EXIT_OK
    print(f"configuration OK ({args.config or 'no file: defaults + environment'})")
    for section, values in dump.items():
        print(f"\n[{section}]")
        for key, value in values.items():
            origin = sources.get(section, {}).get(key, "default")
            print(f"{key} = {value}".ljust(60) + f"  ; {origin}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from fs_cc360.demo import run_demo

    return run_demo(calls=args.calls, outage=args.outage, quiet=args.quiet, out=sys.stdout)
