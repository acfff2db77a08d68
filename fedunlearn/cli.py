"""The `fedunlearn` command: run | experiment | suite | report | audit | data info."""

from __future__ import annotations

import argparse
import signal
import sqlite3
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

from fedunlearn.config import CHOICES
from fedunlearn.errors import FedUnlearnError
from fedunlearn.unlearning.registry import METHODS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedunlearn", description="Federated recommendation with client unlearning.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('fedunlearn')}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train one configuration and write a results folder")
    run.add_argument("config", nargs="?", help="TOML config file (default: the built-in demo on synthetic data)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.rounds=10 (repeatable)",
    )
    run.add_argument(
        "--engine", choices=CHOICES["run.engine"], help="shorthand for --set run.engine=..."
    )
    run.add_argument("--out", help="results folder to create (default: results/run-<time>)")
    run.add_argument("--drop", help='clients leave and ask to be forgotten, e.g. "12,57@20;3@30"')
    run.add_argument("--drop-random", help='seeded random drops, e.g. "5%%@20" or "7@20"')
    run.add_argument(
        "--method", choices=list(METHODS), help="unlearning method"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue an interrupted run (RUN_DIR or RUN_DIR.partial) with its own config, to the numbers of an "
        "uninterrupted one",
    )  # fmt: skip

    experiment = commands.add_parser("experiment", help="run every setting of an experiment file into one table")
    experiment.add_argument("file", help="experiment TOML (see experiments/)")
    experiment.add_argument(
        "--out", required=True, help="folder to create: table.csv, table.md, one folder per setting"
    )
    experiment.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting in every row (repeatable)",
    )
    experiment.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run just this setting (repeatable)"
    )
    experiment.add_argument(
        "--seeds", metavar="K,K,...", help="run every setting with these seeds instead of the file's (e.g. 11,12)"
    )
    experiment.add_argument("--quiet", action="store_true", help="no progress bars")
    experiment.add_argument(
        "--resume", action="store_true", help="continue the experiment in --out: finished runs are kept, others rerun"
    )
    experiment.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, each in its own process (default 1: wall times stay clean)"
    )

    suite = commands.add_parser("suite", help="every experiment of a suite file, then one report over them")
    suite.add_argument("file", help="suite TOML (experiments/suite_ml100k.toml)")
    suite.add_argument("--out", required=True, help="folder to create: one folder per experiment, report/, suite.md")
    suite.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting in every run of every experiment (repeatable)")  # fmt: skip
    suite.add_argument("--jobs", type=int, default=1, help="runs at a time within an experiment")
    suite.add_argument("--quiet", action="store_true", help="no progress bars")
    suite.add_argument("--resume", action="store_true", help="continue the suite in --out")

    audit = commands.add_parser(
        "audit", help="attack the user embeddings a run saved (central view) again: global and local audit"
    )
    audit.add_argument("run_dir", help="a results folder written with audit.enabled or a defence")
    audit.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="change audit settings, e.g. --set audit.attackers=[mlp] --set run.seed=1 (repeatable)",
    )  # fmt: skip
    audit.add_argument("--out", help="also write the table to this CSV file")

    report = commands.add_parser(
        "report", help="report.md, report.html and plots of finished run or experiment folders, side by side"
    )
    report.add_argument("folders", nargs="+", metavar="RUN_OR_EXPERIMENT_DIR",
                        help="results folders to report on (runs, experiments, or a benchmark script's --out)")
    report.add_argument("--out", required=True, help="folder to create for the report")

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    info = data_commands.add_parser("info", help="users, items, interactions, density, attributes")
    info.add_argument("dataset", help="synthetic | ml-100k | ml-1m | csv")
    info.add_argument("--path", default="", help="csv: interactions file")
    info.add_argument("--users", default="", help="csv: users file")
    return parser


# `fedunlearn run` with no arguments: train on the synthetic default, drop 2% of the clients at
# round 15, erase them with FedEraser and show every method side by side at that moment; then audit
# attribute privacy globally and locally, let every client at risk run AttrCloak-DD, audit again
DEMO = ['unlearn.drop_random="2%@15"', "unlearn.method=federaser", "unlearn.compare=true"]
DEMO += ["defence.method=attrcloak-dd", "defence.clients=at-risk", "defence.steps=40", "audit.attackers=[mlp]"]


def _run(args: argparse.Namespace) -> None:
    import pandas as pd

    from fedunlearn.config import load_config
    from fedunlearn.runs.results import run_folder_of, staged, write_config, write_run
    from fedunlearn.runs.runner import execute
    from fedunlearn.runs.tables import readable

    overrides = list(args.overrides) + ([f"run.engine={args.engine}"] if args.engine else [])
    overrides += [f"unlearn.method={args.method}"] if args.method else []
    overrides += [f"unlearn.drop={_toml_string(args.drop)}"] if args.drop else []
    overrides += [f"unlearn.drop_random={_toml_string(args.drop_random)}"] if args.drop_random else []
    if args.resume and (args.config or overrides or args.out):
        raise FedUnlearnError("--resume continues a run with its own config.toml: drop the config, --set and --out")
    if args.config is None and not overrides and not args.resume:
        overrides = DEMO
        print("demo: federated MF on synthetic data; 2% of the clients leave at round 15 (FedEraser)")
    default = f"results/run-{time.strftime('%Y%m%d-%H%M%S')}"
    out = run_folder_of(args.resume) if args.resume else Path(args.out or default)
    config = None if args.resume else load_config(args.config, overrides)
    args.out_folder = out  # for the interruption message
    with staged(out, resume=bool(args.resume)) as staging:
        if config is None:
            config = load_config(staging.folder / "config.toml")
            print(f"resuming {out}", file=sys.stderr)
        else:
            write_config(staging.folder, config)  # what --resume reads
        outcome = execute(config, staging.folder, show_progress=not args.quiet)
        config = outcome.config  # as it ran (the engine `auto` chose, ...)
        staging.final = write_run(staging.folder, config, outcome.result, outcome.info)
    final, mode = outcome.result.final, config.run.mode
    what = {"federated": f"{config.model.name}, federated, engine {config.run.engine}",
            "central": f"{config.model.name}, central"}.get(mode, mode)  # popularity: no model, no engine
    print(f"HR@10 {final['HR@10']:.4f}  NDCG@10 {final['NDCG@10']:.4f}  ({what}, {outcome.info['seconds']:.1f} s)")
    if outcome.result.comparison:
        columns = ["event", "method", "HR@10", "NDCG@10", "MIA_AUC", "client_epochs", "optimizer_steps",
                   "unlearn_seconds", "speedup", "speedup_time", "L2_to_retrain"]  # fmt: skip
        table = pd.DataFrame(outcome.result.comparison)
        print("unlearning at each drop event, every method tried on a copy of the server and timed on its own "
              "(retained users, model right after unlearning; speedup over Retrain in client-epochs, '-' "
              "where a method trained nothing; speedup_time in wall time, one measurement, '-' where the "
              "event took under 0.1 s):")  # fmt: skip
        print(readable(table[[c for c in columns if c in table.columns]]))
    if outcome.result.privacy is not None:
        from fedunlearn.runs.tables import privacy_summary

        report = outcome.result.privacy
        if report.table.empty:
            print("attribute privacy: no attribute could be attacked (too few clients per class; see above)")
        else:
            if config.defence.method != "none":
                reach = f"{report.defending} clients defended"
            elif config.defence.compare:
                reach = f"every defence tried on {report.defending} clients, none kept"
            elif config.defence.upload != "none":
                reach = f"no post-training defence, the uploads defended with {config.defence.upload}"
            else:
                reach = "the audit alone, no defence"
            print(f"attribute privacy ({reach}; audit.csv has every view and attacker):")
            print(readable(privacy_summary(report.table), digits=3))
    print(f"results: {out}")


def _seed_list(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise FedUnlearnError(f"--seeds {text!r} must be whole numbers >= 0 separated by commas, e.g. --seeds 11,12")
    return [int(part) for part in parts]


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _experiment(args: argparse.Namespace) -> None:
    from fedunlearn.runs.experiment import run_experiment
    from fedunlearn.runs.tables import readable

    table = run_experiment(
        args.file, args.out, args.overrides, show_progress=not args.quiet, jobs=args.jobs, only=args.only,
        resume=args.resume, seeds=None if args.seeds is None else _seed_list(args.seeds),
    )  # fmt: skip
    print(readable(table))
    print(f"results: {args.out}")


def _audit(args: argparse.Namespace) -> None:
    """Attack the embeddings a run saved, with the attribute values saved beside them: the data is
    not rebuilt, so `--set run.seed=K` changes the shadow split and the attackers' seeds only."""
    import numpy as np
    import pandas as pd

    from fedunlearn.config import load_config
    from fedunlearn.privacy.audit import privacy_table, say_values_left_out
    from fedunlearn.runs.results import EMBEDDINGS_FILE, read_central_view, saved_attributes, write_audit_csv
    from fedunlearn.runs.tables import readable

    run = Path(args.run_dir)
    if run.name.endswith(".partial") or not (run / "final.json").is_file():
        raise FedUnlearnError(f"{run} is not a finished run (no final.json): audit a finished results folder")
    saved = run / EMBEDDINGS_FILE
    if not saved.is_file():
        raise FedUnlearnError(f"{run} has no {saved.name}: rerun with --set audit.enabled=true (or a defence)")
    data_keys = [item.split("=", 1)[0] for item in args.overrides if item.strip().startswith("data.")]
    if data_keys:
        raise FedUnlearnError(f"{', '.join(data_keys)}: the audit attacks the data the run saved; "
                              "drop these --set (audit.*, defence.risk_threshold and run.seed apply)")  # fmt: skip
    out = Path(args.out) if args.out else None
    if out is not None and (out.exists() or run.resolve() in out.resolve().parents):
        raise FedUnlearnError(f"--out {out} exists or lies inside the run folder: choose a new file outside it")
    if out is not None and not out.parent.is_dir():  # said now, not after the whole audit
        raise FedUnlearnError(f"--out {out}: folder {out.parent} does not exist: create it or choose another file")
    config = load_config(run / "config.toml", args.overrides)
    arrays = read_central_view(saved)
    if not all(np.isfinite(arrays[stage]).all() for stage in ("before", "after") if stage in arrays):
        raise FedUnlearnError(f"{saved} holds non-finite embeddings: nothing can be audited from it")
    attributes = saved_attributes(arrays)
    if attributes.empty:
        raise FedUnlearnError(f"{saved} holds no attribute values (written before they were saved): rerun the run")
    tables = []
    say_values_left_out(config.audit, attributes)
    for stage in [name for name in ("before", "after") if name in arrays]:
        table, _ = privacy_table({"embedding": arrays[stage]}, attributes, config)
        tables.append(table.assign(stage=stage))
    table = pd.concat(tables, ignore_index=True)
    columns = ["stage", "attacker", "attribute", "audit", "accuracy", "balanced_accuracy",
               "balanced_accuracy_relabelled", "chance", "null_95", "at_risk"]  # fmt: skip
    print(readable(table[[c for c in columns if c in table.columns]]))
    if out is not None:
        write_audit_csv(table, out)


def _suite(args: argparse.Namespace) -> None:
    from fedunlearn.runs.suite import run_suite

    plots = run_suite(args.file, args.out, args.overrides, not args.quiet, args.jobs, args.resume)
    print(f"suite: {Path(args.out) / 'suite.md'}; report with {len(plots)} plots in {Path(args.out) / 'report'}")


def _report(args: argparse.Namespace) -> None:
    from fedunlearn.runs.report import write_report

    out = Path(args.out)
    plots = write_report([Path(folder) for folder in args.folders], out)
    print(f"report: {out / 'report.md'}, {out / 'report.html'} and {len(plots)} plots ({', '.join(plots)})")


def _data_info(args: argparse.Namespace) -> None:
    from fedunlearn.data import load_dataset
    from fedunlearn.data.dataset import describe

    print(describe(load_dataset(args.dataset, path=args.path, users_path=args.users)))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as SIGINT: the staging folder is kept for --resume


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "run":
            _run(args)
        elif args.command == "experiment":
            _experiment(args)
        elif args.command == "audit":
            _audit(args)
        elif args.command == "report":
            _report(args)
        elif args.command == "suite":
            _suite(args)
        else:
            _data_info(args)
    except FedUnlearnError as err:
        print(f"fedunlearn: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a results or config path that cannot be created, written or read
        where = f" {err.filename}" if err.filename else ""
        print(f"fedunlearn: error: cannot write or read{where}: {err.strerror or err}; check the path and free space",
              file=sys.stderr)  # fmt: skip
        return 2
    except sqlite3.OperationalError as err:  # the history or checkpoint database (disk full, say)
        out = getattr(args, "out_folder", None)
        hint = f"; free space, then fedunlearn run --resume {out}" if out else ""
        print(f"fedunlearn: error: the run's database failed: {err}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out_folder", None)
        if out:
            hint = f"; continue with: fedunlearn run --resume {out}"
        elif args.command in ("experiment", "suite"):
            hint = f"; continue with: fedunlearn {args.command} {args.file} --out {args.out} --resume (same --set"
            hint += ", --only and --seeds)" if args.command == "experiment" else ")"
        else:
            hint = "; no results folder was written"
        print(f"fedunlearn: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
