"""Command line: ``python -m cpkernels demo`` (or the ``cpkernels`` console script)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cpkernels", description="CP-decomposed convolutions.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="decompose three conv layers and compare them with dense nn.Conv2d")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
