"""The `denoised` command line."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="denoised", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve models over HTTP")
    args = parser.parse_args(argv)
    if args.command == "serve":
        print("denoised: the serving engine is not built yet (see the issue tracker).")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
