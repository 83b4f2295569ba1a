"""Command line: ``python -m cpkernels demo|profile`` (or the ``cpkernels`` console script)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["profile"]:
        from .profile import main as profile_main

        return profile_main(argv[1:])
    parser = argparse.ArgumentParser(prog="cpkernels", description="CP-decomposed convolutions.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="decompose three conv layers and compare them with dense nn.Conv2d")
    sub.add_parser("profile", help="profile one CP layer (cpkernels profile --help)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
