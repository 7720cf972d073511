"""CLI: ``rigfm logs check FILES... [--recover]``, ``rigfm dataset build RUNS... -o DATASET.npz`` and
``rigfm dataset export DATASET.npz --format lerobot -o DIR``.

Cheap to import: the MCAP/numpy work is imported inside the handlers."""

from __future__ import annotations

import argparse
import json
import sys

from fm_core.cli_types import SEED, call_with_args, finite_float, int_range


def _group(subparsers, name: str, help: str):
    """Command ``rigfm NAME`` whose subcommands are added to the returned action (one is required)."""
    return subparsers.add_parser(name, help=help).add_subparsers(dest=f"{name}_cmd", required=True)


def register(subparsers) -> None:
    """Add the ``logs`` and ``dataset`` subcommands."""
    chk = _group(subparsers, "logs", "inspect run logs (MCAP)").add_parser(
        "check",
        help="verify MCAP run logs: footer/summary, CRCs, readable messages, per-topic counts, seq gaps")
    chk.add_argument("files", nargs="+", help="MCAP files (parts of one run are also checked for continuity)")
    chk.add_argument(
        "--recover",
        action="store_true",
        help="rewrite every damaged/truncated FILE as FILE.recovered.mcap (all readable data kept)",
    )
    chk.add_argument("--json", action="store_true", help="print one JSON object per file instead of text")
    chk.set_defaults(func=_check)

    ds_sub = _group(subparsers, "dataset", "build fine-tuning datasets from run logs")
    b = ds_sub.add_parser(
        "build",
        help="logged runs (MCAP files or directories) -> trajectory dataset (.npz, fm_core.trajfile format)")
    b.add_argument("runs", nargs="+", help="MCAP files or directories of them (parts grouped by run id)")
    b.add_argument("-o", "--output", required=True, help="output dataset path (.npz)")
    b.add_argument("--window", type=int_range(2, 10**7), default=256,
                   help="window length in model steps (default 256)")
    b.add_argument("--stride", type=int_range(1, 10**7), default=None,
                   help="window stride (default window/2)")
    b.add_argument(
        "--model-dt", type=finite_float(0, 3600, lo_open=True, unit="s"), default=None,
        help="grid step (s); default rig_config.model_dt, else 0.01"
    )
    b.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions, by run")
    b.add_argument("--seed", type=SEED, default=0, help="seed of the run-to-split assignment")
    b.add_argument(
        "--exclude-flags",
        type=int_range(-1, 2**32 - 1),
        default=None,
        help="device status bits that invalidate a sample, e.g. 0x50f; -1 = any flag (default: e-stop, "
        "watchdog, limit, fault, rx error, and clamped with --input command)",
    )
    b.add_argument(
        "--input",
        choices=["command", "applied"],
        default="command",
        help="u = commanded voltage (zero-order hold of /command) or the firmware-applied voltage "
        "(/state applied_voltage)",
    )
    b.add_argument("--max-gap", type=finite_float(0, 3600, lo_open=True, unit="s"), default=None,
                   help="largest state gap in s (default 2*dt)")
    b.add_argument("--max-cmd-age", type=finite_float(0, 3600, lo_open=True, unit="s"), default=0.05,
                   help="oldest usable command (s)")
    b.add_argument("--json", action="store_true", help="print the build report as JSON")
    b.set_defaults(func=_build)

    ex = ds_sub.add_parser(
        "export",
        help="trajectory dataset (.npz from dataset build) -> another tool's format (LeRobot v3.0)",
    )
    ex.add_argument("dataset", help="dataset .npz written by rigfm dataset build (format 2)")
    ex.add_argument("--format", choices=["lerobot"], default="lerobot", help="output format")
    ex.add_argument("-o", "--output", required=True, help="output directory (the LeRobot dataset root)")
    ex.add_argument("--task", default=None, help="task description stored with every episode")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    ex.add_argument("--json", action="store_true", help="print the export report as JSON")
    ex.set_defaults(func=_export)


def _check(args: argparse.Namespace) -> int:
    from hardware.log_check import check_file, check_run_continuity, recover_file
    from hardware.log_reader import LogFileError

    rc = 0
    reports = []
    for path in args.files:
        try:
            rep = check_file(path)
        except LogFileError as exc:
            print(f"ERROR {exc}", file=sys.stderr)
            rc = 1
            continue
        if not rep.ok and args.recover:
            try:
                out, n = recover_file(path)
            except OSError as exc:
                print(f"ERROR {path}: cannot write the recovered file: {exc}", file=sys.stderr)
                rc = 1
            else:
                if n == 0:  # nothing readable: no recovered file, and the check failed
                    out.unlink(missing_ok=True)
                    print(f"ERROR {path}: nothing to recover (0 readable messages; the file holds no "
                          "complete chunk)", file=sys.stderr)
                    rc = 1
                else:
                    rep.recovered_path, rep.recovered_messages = out, n
        elif not rep.ok:
            rc = 1
        reports.append(rep)
        if args.json:
            print(json.dumps(rep.as_dict()))
        else:
            print(rep.format())
    for line in check_run_continuity(reports):
        print(line)
    return rc


def _build(args: argparse.Namespace) -> int:
    from hardware.dataset_build import DatasetBuildError, build_dataset
    from hardware.log_reader import LogFileError

    try:
        report = call_with_args(build_dataset, args, paths=args.runs, out=args.output,
                                input_source=args.input, max_gap_s=args.max_gap,
                                max_cmd_age_s=args.max_cmd_age)
    except (DatasetBuildError, LogFileError) as exc:
        print(f"dataset build: error: {exc}", file=sys.stderr)
        return 2
    for line in report["skipped"]:
        print(f"dataset build: warning: {line}", file=sys.stderr)
    for line in report["warnings"]:
        print(f"dataset build: WARNING: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"wrote {report['out']}: x {report['shape_x']}, u {report['shape_u']}, dt {report['dt']} s, "
          f"rig {report['rig']}")
    print(f"windows: {report['windows']}  ({report['note']})")
    for run_id, info in report["runs"].items():
        pts = info["points"]
        excluded = ", ".join(f"{k} {v}" for k, v in pts.items() if k not in ("grid", "valid") and v)
        print(f"  {run_id}: {pts['valid']}/{pts['grid']} grid points valid"
              f"{' (excluded: ' + excluded + ')' if excluded else ''}; windows {info['split']}")
        for w in info["warnings"]:
            print(f"    warning: {w}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fm_core.trajfile import TrajectoryFileError
    from hardware.lerobot_export import ExportError, export_lerobot

    try:
        report = export_lerobot(args.dataset, args.output, task=args.task, overwrite=args.overwrite)
    except (ExportError, TrajectoryFileError) as exc:
        print(f"dataset export: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {report['out']}: LeRobot v3.0, {report['episodes']} episodes, "
              f"{report['frames']} frames at {report['fps']} fps (from {report['windows']} windows), "
              f"splits {report['splits']}")
    return 0
