"""The `dynasparse` command (also `python -m dynasparse`)."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(_args) -> int:
    import torch

    import dynasparse

    print(f"dynasparse {dynasparse.__version__}  (torch {torch.__version__}, python {platform.python_version()}, "
          f"{torch.get_num_threads()} CPU threads)")
    print()
    print(dynasparse.format_backends())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dynasparse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands.add_parser("info", help="versions and the backends table: what is built and usable here, and why not")
    commands.add_parser("bench", help="time sparse kernels against dense PyTorch (dynasparse bench --help)",
                        add_help=False)
    commands.add_parser("demo", help="sparse training of a small CNN on digits: dense, magnitude pruning and DPF "
                        "(dynasparse demo --help)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from dynasparse.demo import main as demo_main

        return demo_main(rest)
    if args.command == "bench":
        from dynasparse.bench.harness import main as bench_main

        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
