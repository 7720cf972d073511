"""The `rigfm` umbrella CLI: torch-free help, and every command's bad input -> one named line, exit 2.

The table runs `controllers.cli.main` in-process (fast); the connection errors of `rigfm run` use real
files, a real pty nobody answers, a real virtual Furuta rig, real predictor processes and real ZeroMQ
endpoints; one subprocess test checks what a user's console shows for some of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_models import export_run_models

from controllers.cli import build_parser, main
from hardware import protocol as proto

TRACE = "Traceback"
ROOT = Path(__file__).resolve().parents[1]


def test_umbrella_help_lists_without_torch_import():
    code = (
        "import sys; from controllers.cli import build_parser; p = build_parser(); "
        "h = p.format_help(); print(h); assert 'torch' not in sys.modules, 'CLI import pulled torch'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "rigfm" in out.stdout


def test_one_registry_names_every_command_module_and_one_override_option():
    from controllers.cli import COMMAND_MODULES

    registering = set()
    for pkg in ("fm_core", "rigs", "hardware", "export", "controllers"):
        for f in sorted((ROOT / pkg).glob("*.py")):
            text = f.read_text()
            if "def register(" in text and "add_parser(" in text:
                registering.add(f"{pkg}.{f.stem}")
            # every KEY=VALUE override is `--set`, declared by add_set_option (never by hand)
            assert 'add_argument("--set"' not in text or f.name == "cli_types.py", f
            for old in ('"--param"', '"--override"', '"--virtual-param"', '"--model-param"'):
                assert old not in text, (f, old)
    assert registering == set(COMMAND_MODULES)
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"pretrain", "finetune", "run", "rig-info", "score", "flywheel", "evaluate"} <= set(commands)
    for name in ("run", "collect", "rig-info", "virtual-rig", "flywheel", "evaluate", "finetune", "pretrain"):
        opts = {s for a in commands[name]._actions for s in a.option_strings}
        assert "--set" in opts, name


def _run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    return rc, capsys.readouterr().err


def _one_named_line(err: str, *needles: str, predictor: bool = False) -> str:
    """stderr holds one line (with ``predictor``: besides what the run's predictor process logged, echoed
    with its ``rigfm-serve:`` / ``rigfm serve:`` prefix), no traceback, and that line names the problem."""
    text = err.strip()
    assert TRACE not in text, text
    echoed = ("rigfm-serve: ", "rigfm serve: ") if predictor else ()
    own = [ln for ln in text.splitlines() if not (echoed and ln.startswith(echoed))]
    assert len(own) == 1, text
    last = own[0]
    for n in needles:
        assert n in last, (n, last)
    return last


RUN = ["run", "cartpole", "--virtual"]
EXPORT = ["export", "ck.pt", "-o", "m.onnx"]
BUILD = ["dataset", "build", "runs", "-o", "d.npz"]

# (argv, what the one line must contain): parse-time ranges of every numeric option of every command
BAD = [
    (RUN + ["--rate", "0"], "argument --rate: must be a finite number in (0, 10000] Hz, got '0'"),
    (RUN + ["--rate", "-5"], "argument --rate: must be a finite number in (0, 10000] Hz, got '-5'"),
    (RUN + ["--rate", "1e9"], "argument --rate: must be a finite number in (0, 10000] Hz, got '1e9'"),
    (RUN + ["--rate", "nan"], "argument --rate: must be a finite number"),
    (RUN + ["--rate", "fast"], "argument --rate: must be a number in (0, 10000] Hz, got 'fast'"),
    (RUN + ["--duration", "-5"], "argument --duration: must be a finite number in (0, 1e+07] s, got '-5'"),
    (RUN + ["--duration", "0"], "argument --duration: must be a finite number in (0, 1e+07] s, got '0'"),
    (RUN + ["--duration", "nan"], "argument --duration: must be a finite number"),
    (RUN + ["--duration", "inf"], "argument --duration: must be a finite number"),
    (RUN + ["--latency-comp-ms", "1e9"], "argument --latency-comp-ms: must be a finite number in [0, 50] ms"),
    (RUN + ["--latency-comp-ms", "100"], "argument --latency-comp-ms: must be a finite number in [0, 50] ms"),
    (RUN + ["--latency-comp-ms", "-10"], "argument --latency-comp-ms: must be a finite number in [0, 50] ms"),
    (RUN + ["--predictor-timeout-ms", "-5"], "argument --predictor-timeout-ms: must be a finite number in ("),
    (RUN + ["--predictor-timeout-ms", "0"], "argument --predictor-timeout-ms: must be a finite number in (0"),
    (RUN + ["--stale-ms", "nan"], "argument --stale-ms: must be a finite number"),
    (RUN + ["--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295], got '-1'"),
    (RUN + ["--set", "plant.pole_mass_scale=nan"], "--set 'plant.pole_mass_scale=nan': value 'nan' is not"),
    (RUN + ["--set", "oops"], "--set 'oops': expected KEY=VALUE"),
    (RUN + ["--log", "/dev/null/runs"], "--log /dev/null/runs: cannot create the log "
                                        "directory (Not a directory)"),
    (RUN + ["--set", "pole_mass_scale=1"], "--set 'pole_mass_scale=1': the key must be SECTION.NAME"),
    (["demo", "--duration", "0"], "argument --duration: must be a finite number in (0, 1e+07] s"),
    (["latency", "m.onnx", "--rate-hz", "-5"], "argument --rate-hz: must be a finite number in [0, 10000] H"),
    (["latency", "m.onnx", "--rate-hz", "nan"], "argument --rate-hz: must be a finite number"),
    (["latency", "m.onnx", "--rate-hz", "1e9"], "argument --rate-hz: must be a finite number in [0, 10000]"),
    (["latency", "m.onnx", "--window", "0"], "argument --window: must be an integer in [1, 65536]"),
    (["latency", "m.onnx", "--iters", "3"], "argument --iters: must be an integer in [10, 100000000]"),
    (["latency", "m.onnx", "--max-rtt-p99-ms", "nan"], "argument --max-rtt-p99-ms: must be a finite number"),
    (["latency", "m.onnx", "--client-cpu", "-1"], "argument --client-cpu: must be an integer in [0, 65535]"),
    (["collect", "cartpole", "-o", "x", "--runs", "0"], "argument --runs: must be an integer in [1, 1000000"),
    (["collect", "cartpole", "-o", "x", "--duration", "nan"], "argument --duration: must be a finite number"),
    (["collect", "cartpole", "-o", "x", "--rate", "0"], "argument --rate: must be a finite number in (0, 10"),
    (["collect", "cartpole", "-o", "x", "--upright-fraction", "2"], "argument --upright-fraction: must be a "
                                                                    "finite number in [0, 1], got '2'"),
    (["collect", "cartpole", "-o", "x", "--set", "pole_mass_scale=nan"], "--set 'pole_mass_scale=nan': "
                                                                         "value 'nan' is not finite"),
    (["collect", "segway", "-o", "x"], "rigfm collect: unknown rig 'segway'"),
    (["evaluate", "--seeds", "0"], "argument --seeds: must be an integer in [1, 1000], got '0'"),
    (["evaluate", "--jobs", "0"], "argument --jobs: must be an integer in [1, 256]"),
    (["evaluate", "--threads", "0"], "argument --threads: must be an integer in [1, 1024]"),
    (["evaluate", "--steps", "-1"], "argument --steps: must be an integer in [1, 1000000000]"),
    (["evaluate", "--duration", "inf"], "argument --duration: must be a finite number"),
    (["evaluate", "--context", "0"], "argument --context: must be an integer in [1, 65536]"),
    (["evaluate", "--quick", "--set", "nosuch=1"], "unknown budget field 'nosuch'"),
    (["evaluate", "--quick", "--fractions", "abc"], "--fractions: expected comma-separated numbers"),
    (["flywheel", "--duration", "0"], "argument --duration: must be a finite number in (0, 1e+06] s"),
    (["flywheel", "--steps", "0"], "argument --steps: must be an integer in [1, 1000000000]"),
    (["flywheel", "--stale-ms", "nan"], "argument --stale-ms: must be a finite number"),
    (["flywheel", "--window", "1"], "argument --window: must be an integer in [2, 10000000]"),
    (["flywheel", "--set", "plant.a=b"], "--set 'plant.a=b': value 'b' is not a number"),
    (["serve", "m.onnx", "--threads", "0"], "argument --threads: must be an integer in [1, 1024]"),
    (["serve", "m.onnx", "--spin-us", "-1"], "argument --spin-us: must be a finite number in [0, 1e+06] us"),
    (["serve", "m.onnx", "--spin-us", "nan"], "argument --spin-us: must be a finite number"),
    (EXPORT + ["--context", "0"], "argument --context: must be an integer in [1, 65536]"),
    (EXPORT + ["--dt", "0"], "argument --dt: must be a finite number in (0, 3600] s, got '0'"),
    (EXPORT + ["--dt", "nan"], "argument --dt: must be a finite number"),
    (EXPORT + ["--n", "0"], "argument --n: must be an integer in [1, 1024]"),
    (EXPORT + ["--opset", "3"], "argument --opset: must be an integer in [7, 30]"),
    (["score", "m.onnx", "--data", "d.npz", "--context", "0"], "argument --context: must be an integer in ["),
    (["score", "m.onnx", "--data", "d.npz", "--horizon", "-1"], "argument --horizon: must be an integer in "),
    (["pretrain", "--nproc", "0"], "argument --nproc: must be an integer in [1, 1024]"),
    (["finetune", "--data", "d.npz", "--fraction", "0"], "argument --fraction: must be a finite number in ("),
    (["finetune", "--data", "d.npz", "--fraction", "1.5"], "argument --fraction: must be a finite number"),
    (["finetune", "--data", "d.npz", "--lr", "nan"], "argument --lr: must be a finite number in (0, 10]"),
    (["finetune", "--data", "d.npz", "--steps", "0"], "argument --steps: must be an integer"),
    (["generate", "--out", "x", "--trajectories", "0"], "argument --trajectories: must be an integer in [1,"),
    (["generate", "--out", "x", "--shard-size", "0"], "argument --shard-size: must be an integer in [1,"),
    (BUILD + ["--window", "1"], "argument --window: must be an integer in [2, 10000000], got '1'"),
    (BUILD + ["--stride", "0"], "argument --stride: must be an integer in [1, 10000000]"),
    (BUILD + ["--model-dt", "0"], "argument --model-dt: must be a finite number in (0, 3600] s"),
    (BUILD + ["--max-gap", "nan"], "argument --max-gap: must be a finite number"),
    (BUILD + ["--max-cmd-age", "-1"], "argument --max-cmd-age: must be a finite number in (0, 3600] s"),
    (BUILD + ["--exclude-flags", "lots"], "argument --exclude-flags: must be an integer in [-1, 4294967295]"),
    (["virtual-rig", "cartpole", "--ber", "2"], "argument --ber: must be a finite number in [0, 1], got '2'"),
    (["virtual-rig", "cartpole", "--drop-rate", "-0.1"], "argument --drop-rate: must be a finite number in "),
    (["virtual-rig", "cartpole", "--latency-ms", "nan"], "argument --latency-ms: must be a finite number"),
    (["virtual-rig", "cartpole", "--garbage-rate", "inf"], "argument --garbage-rate: must be a finite numbe"),
    (["virtual-rig", "cartpole", "--duration", "0"], "argument --duration: must be a finite number in (0,"),
    (["virtual-rig", "cartpole", "--telemetry-divider", "0"], "argument --telemetry-divider: must be an int"),
    (["rig-info", "cartpole", "--set", "pole_mass_scale=inf"],
     "--set 'pole_mass_scale=inf': value 'inf' is not finite"),
    # rig-dependent ranges, checked by controllers.session before anything starts
    (RUN + ["--rate", "2000"], "--rate must be in [40, 1000] Hz for rig 'cartpole'"),
    (RUN + ["--rate", "10"], "--rate must be in [40, 1000] Hz for rig 'cartpole'"),
    (RUN + ["--stale-ms", "1"], "--stale-ms must be in (4, 10000] ms"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_numeric_options_are_one_named_line_exit_2(argv, needle, capsys):
    rc, err = _run_main(argv, capsys)
    assert rc == 2, err
    _one_named_line(err, needle)


# --------------------------------------------------------------------------- rigfm run: connection errors
def _decoded_types(raw: bytes) -> set[str]:
    dec = proto.FrameDecoder()
    return {type(m).__name__ for _, m in dec.feed(raw)}


def test_run_port_errors_name_the_cause(tmp_path, capsys):
    regular = tmp_path / "notes.txt"
    regular.write_text("hello")
    cases = [
        ("/dev/ttyNOPE", ["/dev/ttyNOPE: no such device", "plugged in"]),
        ("/dev/null", ["/dev/null: not a serial port (a character device but not a tty)"]),
        (str(regular), [f"{regular}: not a serial port (a regular file)"]),
        (str(tmp_path), [f"{tmp_path}: not a serial port (a directory)"]),
    ]
    for port, needles in cases:
        rc, err = _run_main(["run", "cartpole", "--port", port, "--duration", "1", "--quiet"], capsys)
        assert rc == 2, err
        _one_named_line(err, "rigfm run: ", *needles)


def test_run_on_a_pty_nobody_answers_times_out_by_name_and_sends_only_hello(capsys):
    master, slave = os.openpty()
    try:
        t0 = time.monotonic()
        rc, err = _run_main(["run", "cartpole", "--port", os.ttyname(slave), "--duration", "1", "--quiet"],
                            capsys)
        assert rc == 2 and time.monotonic() - t0 < 30
        _one_named_line(err, "no HELLO_REPLY within 2 s", "firmware flashed", "baud rate 1000000")
        os.set_blocking(master, False)
        raw = b""
        try:
            while chunk := os.read(master, 65536):
                raw += chunk
        except BlockingIOError:
            pass
        assert _decoded_types(raw) == {"Hello"}  # the host only said HELLO: no COMMAND ever went out
    finally:
        os.close(master)
        os.close(slave)


def test_run_against_a_furuta_rig_names_the_rig_that_answered(capsys):
    from hardware.virtual_rig_process import VirtualRigProcess

    with VirtualRigProcess("furuta") as vr:
        rc, err = _run_main(["run", "cartpole", "--port", vr.port, "--duration", "1", "--quiet"], capsys)
        time.sleep(0.4)  # the rig writes its stats every 0.25 s
        st = vr.stats()
    assert rc == 2
    _one_named_line(err, "device is a furuta rig but the rig config 'cartpole' is a cartpole")
    assert st["firmware"]["commands"] == 0 and st["output_voltage"] == 0.0  # never actuated


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return export_run_models(tmp_path_factory.mktemp("run_models"))


def test_run_endpoint_errors_are_named(capsys):
    rc, err = _run_main(RUN + ["--endpoint", "ipc://missing.sock", "--duration", "1", "--quiet"], capsys)
    assert rc == 2
    _one_named_line(err, "--endpoint ipc://missing.sock: no such socket file 'missing.sock'", "rigfm serve")
    rc, err = _run_main(RUN + ["--endpoint", "garbage://x", "--duration", "1", "--quiet"], capsys)
    assert rc == 2
    _one_named_line(err, "--endpoint garbage://x: ZeroMQ cannot use this endpoint (Protocol not supported")


def test_run_with_a_corrupt_model_shows_the_predictors_last_words(models, capsys):
    rc, err = _run_main(RUN + ["--model", str(models["corrupt"]), "--duration", "1", "--quiet"], capsys)
    assert rc == 2
    # the predictor's own error (echoed from its stderr), then ours naming the model and repeating the cause
    assert "rigfm serve: " in err
    _one_named_line(err, f"rigfm run: --model {models['corrupt']}: the predictor failed before READY",
                    "onnxruntime cannot load it", predictor=True)


@pytest.mark.parametrize(("name", "needle"), [
    ("furuta", "was trained for rig 'furuta', but rig config 'cartpole' is rig 'cartpole'"),
    ("dt02", "has dt 0.02 s, but rig config 'cartpole' has dt 0.01 s"),
    ("names", "has states ['a', 'b', 'c', 'd'], but rig config 'cartpole' has states ['p', 'theta', "),
])
def test_run_refuses_a_model_made_for_another_rig(models, name, needle, capsys):
    rc, err = _run_main(RUN + ["--model", str(models[name]), "--duration", "1", "--quiet"], capsys)
    assert rc == 2
    _one_named_line(err, f"rigfm run: --model {models[name]} ", needle, predictor=True)


def test_run_refuses_a_mismatched_model_behind_an_endpoint(models, capsys):
    from export.client import PredictorProcess

    with PredictorProcess(models["furuta"]) as proc:
        rc, err = _run_main(RUN + ["--endpoint", proc.endpoint, "--duration", "1", "--quiet"], capsys)
    assert rc == 2
    _one_named_line(err, f"--endpoint {proc.endpoint} was trained for rig 'furuta'", predictor=True)


def test_console_shows_one_line_and_no_traceback(tmp_path):
    """What a user sees: the real `rigfm` entry point in a subprocess, stderr only the named line."""
    code = "import sys; from controllers.cli import main; sys.exit(main(sys.argv[1:]))"
    for argv, needle in [
        (["run", "cartpole", "--port", "/dev/ttyNOPE"], "rigfm run: /dev/ttyNOPE: no such device"),
        (["run", "cartpole", "--virtual", "--rate", "0"], "rigfm run: error: argument --rate: must be a fin"),
        (["run", "cartpole", "--virtual", "--endpoint", "garbage://x"], "ZeroMQ cannot use this endpoint"),
        (["latency", "m.onnx", "--rate-hz", "nan"], "rigfm latency: error: argument --rate-hz"),
    ]:
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 2, r.stderr
        _one_named_line(r.stderr, needle)


def test_run_summary_shows_the_change_count_and_the_final_mode_not_a_cut_list():
    import numpy as np

    from controllers.run_report import result_jsonable, summary_table
    from controllers.session import RunResult

    stats = {"ticks": 10, "rate_hz": 500.0, "period_err_p50_us": 1.0, "period_err_p99_us": 2.0,
             "period_err_max_us": 3.0, "jitter_us": 1.0, "overruns": 0, "overrun_pct": 0.0,
             "busy_p50_us": 1.0, "busy_p99_us": 2.0}
    modes = ["swingup", "balance"] * 63 + ["estop"]
    changes = [(0.1 * i, modes[i - 1] if i else "idle", m) for i, m in enumerate(modes)]
    pred = {"pred_requests": 5, "pred_late": 0, "pred_failures": 3, "pred_latency_p50_us": 500.0,
            "pred_down_events": [[2.5, "down", "the predictor process was killed by SIGKILL"]]}
    res = RunResult(stats, "limit: base beyond", changes, {}, np.zeros((0, 6)), modes, pred, {})
    table = summary_table(res)
    assert "127 / estop (last: swingup@12.40s, balance@12.50s, estop@12.60s)" in table  # not cut at 8
    assert "predictor down" in table and "at 2.50 s: the predictor process was killed by SIGKILL" in table
    js = result_jsonable(res)
    assert js["mode_change_count"] == 127 and js["final_mode"] == "estop"


def test_permission_denied_names_the_group_to_join():
    """Root opens any tty, so the EACCES branch is driven with the error pyserial raises for a normal user."""
    import grp

    import serial

    from hardware.driver import port_problem

    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        group = grp.getgrgid(os.stat(path).st_gid).gr_name
        exc = serial.SerialException(13, f"could not open port {path}: [Errno 13] Permission denied")
        msg = port_problem(path, exc)
    finally:
        os.close(master)
        os.close(slave)
    assert msg == (f"{path}: permission denied: add your user to the {group!r} group "
                   f"(sudo usermod -aG {group} $USER), then log in again")


def test_status_line_says_down_only_when_the_watch_says_so():
    """One missed deadline is a failed request, not a dead predictor; DOWN needs the watch's verdict."""
    import io

    from controllers.session import status_printer

    def line(**st):
        buf = io.StringIO()
        status_printer(buf)({"rate_hz": 500.0, "jitter_us": 80.0, "mode": "balance", **st})
        return buf.getvalue()

    assert "PREDICTOR DOWN" not in line(pred_fault="PredictorTimeout: 8 ms")
    assert "pred request failed" in line(pred_fault="PredictorTimeout: 8 ms")
    assert "PREDICTOR DOWN" in line(pred_fault="PredictorTimeout: 8 ms", pred_down=True)
    assert "pred request" not in line()


def test_run_flags_are_the_run_options_fields_with_the_same_defaults():
    """Each `rigfm run` option is declared once (controllers.session.RunOptions): the parsed defaults are
    the dataclass defaults, and every flag lands in its field."""
    import dataclasses

    from controllers.session import RunOptions
    from fm_core.cli_types import options_from_args

    args = build_parser().parse_args(["run", "cartpole", "--virtual"])
    assert options_from_args(RunOptions, args) == RunOptions(rig="cartpole", virtual=True)
    args = build_parser().parse_args(["run", "furuta", "--port", "/dev/ttyUSB0", "--controller", "lqr",
                                      "--duration", "3", "--rate", "250", "--quiet", "--log", "d",
                                      "--latency-comp-ms", "2", "--seed", "7", "--foxglove"])
    opts = options_from_args(RunOptions, args)
    assert (opts.rig, opts.port, opts.virtual, opts.controller, opts.duration_s, opts.rate_hz, opts.status,
            opts.log_dir, opts.latency_ms, opts.seed, opts.foxglove) == (
        "furuta", "/dev/ttyUSB0", False, "lqr", 3.0, 250.0, False, "d", 2.0, 7, "8765")
    flagged = {f.name for f in dataclasses.fields(RunOptions) if "rigfm.cli" in f.metadata}
    assert flagged >= {"controller", "estimator", "duration_s", "rate_hz", "model", "stale_ms", "seed"}


def test_flywheel_flags_are_the_config_fields_with_the_same_defaults():
    from controllers.flywheel import FlywheelConfig
    from fm_core.cli_types import options_from_args

    args = build_parser().parse_args(["flywheel"])
    assert options_from_args(FlywheelConfig, args) == FlywheelConfig()
    args = build_parser().parse_args(["flywheel", "--steps", "5", "--init", "a.pt", "--status"])
    cfg = options_from_args(FlywheelConfig, args)
    assert (cfg.finetune_steps, cfg.init_checkpoint, cfg.status) == (5, "a.pt", True)


def test_collect_flags_are_the_options_fields_with_the_same_defaults():
    from pathlib import Path

    from controllers.collect import CollectOptions
    from fm_core.cli_types import options_from_args

    args = build_parser().parse_args(["collect", "furuta", "-o", "d"])
    assert options_from_args(CollectOptions, args) == CollectOptions(rig="furuta", out=Path("d"))
    args = build_parser().parse_args(["collect", "cartpole", "--out", "e", "--runs", "3", "--quiet",
                                      "--estimator", "kf", "--upright-fraction", "0.5"])
    opts = options_from_args(CollectOptions, args)
    assert (opts.runs, opts.progress, opts.estimator, opts.upright_fraction, opts.out) == (
        3, False, "kf", 0.5, Path("e"))


def test_evaluate_flags_are_the_eval_config_fields_with_the_same_defaults():
    from controllers.eval_config import EvalConfig, config_from_args

    assert config_from_args(build_parser().parse_args(["evaluate"])) == EvalConfig()
    args = build_parser().parse_args(["evaluate", "--rigs", "furuta", "--fractions", "0.1,1", "--seeds", "2",
                                      "--models", "fm,ffn", "--data", "f.npz", "--duration", "4",
                                      "--steps", "9", "--angle-features", "raw", "--resume"])
    cfg = config_from_args(args)
    assert (cfg.rigs, cfg.fractions, cfg.seeds, cfg.models, cfg.data, cfg.duration_s, cfg.budget.steps,
            cfg.angle_features, cfg.resume) == (
        ["furuta"], [0.1, 1.0], 2, ["fm", "ffn"], {"furuta": "f.npz"}, 4.0, 9, "raw", True)
    quick = config_from_args(build_parser().parse_args(["evaluate", "--quick", "--runs", "3"]))
    assert quick == EvalConfig.quick_config(runs=3)


def test_finetune_flags_are_the_finetune_config_fields_with_the_same_defaults():
    from fm_core.cli_types import option_values
    from fm_core.train_configs import FinetuneConfig

    args = build_parser().parse_args(["finetune", "--data", "d.npz"])
    assert FinetuneConfig(**option_values(FinetuneConfig, args)) == FinetuneConfig()
    args = build_parser().parse_args(["finetune", "--data", "d.npz", "--mode", "head", "--steps", "7",
                                      "--lr", "1e-3", "--fraction", "0.5", "--seed", "3"])
    assert option_values(FinetuneConfig, args, changed_only=True) == {
        "mode": "head", "steps": 7, "lr": 1e-3, "fraction": 0.5, "seed": 3}


def test_pretrain_options_are_handed_to_the_trainer_unchanged():
    """`rigfm pretrain` and `python -m fm_core.train` share PretrainOptions; option_argv hands them on."""
    from fm_core.cli_types import option_argv, options_from_args
    from fm_core.train import build_arg_parser
    from fm_core.train_configs import PretrainOptions

    assert option_argv(PretrainOptions()) == []
    argv = ["pretrain", "--out", "o", "--resume", "--no-progress", "--config", "c.toml"]
    args = build_parser().parse_args(argv)
    opts = options_from_args(PretrainOptions, args)
    assert opts == PretrainOptions(config="c.toml", out="o", resume=True, progress=False)
    assert options_from_args(PretrainOptions, build_arg_parser().parse_args(option_argv(opts))) == opts


@pytest.mark.parametrize("command", [["virtual-rig", "cartpole"], ["rig-info", "cartpole"],
                                     ["collect", "cartpole", "-o", "d.npz"]])
def test_bare_physics_keys_also_take_run_s_plant_spelling(command):
    """`rigfm run` spells a physics override plant.NAME; the commands whose keys are bare read that spelling
    as NAME instead of rejecting a key that their own list of valid keys names."""
    for key in ("pole_mass_scale", "plant.pole_mass_scale"):
        args = build_parser().parse_args([*command, "--set", f"{key}=1.4"])
        assert args.overrides == [("pole_mass_scale", 1.4)]
