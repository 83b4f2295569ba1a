"""Command line: ``python -m cpkernels demo|profile|plan|compress|export`` (or the ``cpkernels`` console script)."""
from __future__ import annotations

import argparse
import sys

from cpkernels.cli import main as cli_main
from cpkernels.tools.demo import main as demo_main
from cpkernels.tools.profile import main as profile_main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["profile"]:
        return profile_main(argv[1:])
    if argv[:1] == ["demo"]:
        # Its own options (--out, --digits for the small digits CNN, ...): cpkernels demo --help
        return demo_main(argv[1:])
    if argv[:1] in (["plan"], ["compress"], ["export"]):
        return cli_main(argv)
    parser = argparse.ArgumentParser(prog="cpkernels", description="CP-decomposed convolutions.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="compress HED's trained VGG-16, compare its edge maps and CPU time with the dense one "
                                "(--digits: a small CNN trained on the spot; cpkernels demo --help)")
    sub.add_parser("profile", help="profile one CP layer (cpkernels profile --help)")
    sub.add_parser("plan", help="plan one rank per conv of a model for a budget (cpkernels plan --help)")
    sub.add_parser("compress", help="compress a model's convs (cpkernels compress --help)")
    sub.add_parser("export", help="export a compressed model to ONNX (cpkernels export --help)")
    parser.parse_args(argv)  # every command is routed above: this prints the help or the usage error
    return 2


if __name__ == "__main__":
    sys.exit(main())
