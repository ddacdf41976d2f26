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


def _reproduce(argv: list[str]) -> int:
    from dynasparse.experiments import Store, registry

    sub = argparse.ArgumentParser(prog="dynasparse reproduce", description="Train the runs of a registered experiment "
                                  "that are not stored yet (resumable), then write its report: NAME.md with the "
                                  "claims table, NAME.json, PNG plots.")
    sub.add_argument("name", nargs="?", help="the experiment (see --list)")
    sub.add_argument("--list", action="store_true", help="list the registered experiments")
    sub.add_argument("--quick", action="store_true", help="a small version (few steps and seeds): a smoke test")
    sub.add_argument("--out", default=None, help="the experiment directory (default experiment-results/NAME, "
                     "-quick appended with --quick): the run index, the models and the report")
    sub.add_argument("--workers", type=int, default=None,
                     help="worker processes (default: the CPU cores at hand; 0: in this process)")
    sub.add_argument("--data", default=None, metavar="DATA",
                     help="the data set: NAME itself where its runs use DATA, else its variant registered as "
                     "NAME-DATA (zoo-twins and minified: mnist1d, their default, or digits)")
    args = sub.parse_args(argv)
    if args.list:
        for name, description in registry.available().items():
            print(f"{name:<24} {description}")
        return 0
    if args.name is None:
        sub.error("give an experiment NAME or --list")
    known = registry.available()
    if args.name not in known:
        sub.error(f"unknown experiment {args.name!r}; registered: {', '.join(known)}")
    if args.workers is not None and args.workers < 0:
        sub.error("--workers must be >= 0")
    name = args.name if args.data is None else _on_data(sub, known, args.name, args.data)
    out = registry.default_out(name, args.quick) if args.out is None else args.out
    try:
        Store(out)  # a directory that cannot be written fails now, not after the training
    except (OSError, ValueError) as error:
        sub.error(f"--out {out}: {error}")
    result = registry.reproduce(name, out=out, quick=args.quick, workers=args.workers)
    population = result.population
    print(f"{name}: {len(population.records)} runs, {population.computed} trained now, {population.reused} "
          f"already stored ({population.seconds:.1f} s)")
    if population.stale_note():
        print(population.stale_note())
    if result.report is None:
        print(f"{len(population.failed)} run(s) failed; no report written (rerun the command to retry them):")
        for record in population.failed:
            print(f"  {record.run_id} {record.spec.label}: {record.error.strip().splitlines()[-1]}")
        return 1
    from dynasparse.experiments.reports import text_table

    if result.report.claims:
        print(text_table([(claim.claim, claim.verdict) for claim in result.report.claims], ("claim", "verdict")))
    print(f"wrote {', '.join(str(path) for path in result.paths.values())}")
    return 0


def _on_data(sub: argparse.ArgumentParser, known: dict[str, str], name: str, data: str) -> str:
    """The registered experiment that is `name` on data set `data`: NAME-DATA, or NAME itself
    when its runs use that data set."""
    from dynasparse.experiments import registry

    variant = f"{name}-{data}"
    if variant in known:
        return variant
    used = sorted({spec.data for spec in registry.get(name).specs(True)})
    if used == [data]:
        return name
    variants = sorted(other.removeprefix(f"{name}-") for other in known if other.startswith(f"{name}-"))
    sub.error(f"--data {data}: experiment {name!r} runs on {', '.join(used)}, and no {variant!r} is registered"
              + (f" (its variants: {', '.join(variants)})" if variants else ""))


def _runs(argv: list[str]) -> int:
    from dynasparse.experiments import Store
    from dynasparse.experiments.reports import text_table

    sub = argparse.ArgumentParser(prog="dynasparse runs", description="What an experiment directory holds: each "
                                  "run's status and results, and the runs still missing.")
    sub.add_argument("directory", help="an experiment directory (written by dynasparse reproduce or run_population)")
    args = sub.parse_args(argv)
    try:
        store = Store(args.directory, create=False)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        sub.error(str(error))
    records = store.records()
    rows = []
    for record in records:
        metrics = record.metrics or {}
        accuracy = metrics.get("accuracy")
        rows.append((record.run_id, record.spec.label, record.status + ("" if record.complete or
                                                                        record.status != "done" else " (no model)"),
                     "-" if accuracy is None else f"{100 * accuracy:.2f}",
                     "-" if "sparsity" not in metrics else f"{metrics['sparsity']:.4f}",
                     "-" if record.wall_seconds is None else f"{record.wall_seconds:.1f}", str(record.attempts)))
    print(text_table(rows, ("run", "spec", "status", "acc %", "sparsity", "wall s", "attempts")))
    counts = store.counts()
    print(f"\n{len(records)} runs: " + ", ".join(f"{count} {status}" for status, count in counts.items()))
    missing = store.missing()
    if missing:
        print(f"missing ({len(missing)}):")
        for record in missing:
            why = record.error.strip().splitlines()[-1] if record.error else record.status
            if record.status == "done":
                why = "its checkpoint file is gone"
            print(f"  {record.run_id} {record.spec.label}: {why}")
    else:
        print("nothing missing: every run is stored with its model")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dynasparse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands.add_parser("info", help="versions and the backends table: what is built and usable here, and why not")
    commands.add_parser("bench", help="time sparse kernels against dense PyTorch (dynasparse bench --help)",
                        add_help=False)
    commands.add_parser("demo", help="sparse training of a 1-D CNN on MNIST-1D: dense, magnitude pruning, DPF and "
                        "RigL with the DPF claims table, then sparse vs dense speed (dynasparse demo --help)",
                        add_help=False)
    commands.add_parser("reproduce", help="run a registered experiment and write its report: --list, NAME [--quick] "
                        "[--data DATA] [--out DIR] [--workers N] (dynasparse reproduce --help)", add_help=False)
    commands.add_parser("runs", help="what an experiment directory holds and what is missing (dynasparse runs DIR)",
                        add_help=False)
    commands.add_parser("advise", help="time each convertible layer of a model sparse against dense on this machine "
                        "(dynasparse advise BertConfig | module:factory; dynasparse advise --help)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "advise":
        from dynasparse.advise import main as advise_main

        return advise_main(rest)
    if args.command == "reproduce":
        return _reproduce(rest)
    if args.command == "runs":
        return _runs(rest)
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
