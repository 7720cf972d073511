"""The predictor process end to end: real subprocess, real ZeroMQ sockets, real onnxruntime."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from export import schema
from export.client import (
    PredictorClient,
    PredictorError,
    PredictorProcess,
    PredictorRequestError,
    PredictorTimeout,
    PredictorUnavailable,
)
from export.onnx_export import export_checkpoint, save_random_checkpoint
from export.onnx_runtime import OnnxPredictor

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_len": 64}
CONTEXT = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two different tiny models (A, B) with full + step graphs."""
    d = tmp_path_factory.mktemp("srv")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        ck = save_random_checkpoint(d / f"{name}.pt", config=TINY, seed=seed)
        step = d / f"{name}_step.onnx"
        out[name] = export_checkpoint(ck, d / f"{name}.onnx", context=CONTEXT, streaming=step)
    return out


@pytest.fixture
def server(models, tmp_path):
    with PredictorProcess(models["a"].full_path, f"ipc://{tmp_path}/pred.sock") as proc:
        yield proc


def rng_window(seed: int, b: int = 2, t: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, t, 4)).astype(np.float32), rng.normal(size=(b, t, 1)).astype(np.float32)


def test_predict_rollout_stream_match_in_process(server, models):
    local = OnnxPredictor(models["a"].full_path, models["a"].step_path)
    with server.client(5000) as c:
        info = c.info()
        assert (info["n"], info["m"], info["context"], info["streaming_graph"]) == (4, 1, CONTEXT, True)
        assert info["model_sha256"] == local.meta.checkpoint_sha256 and info["dt"] == 0.01
        assert info["stream_reprime"] == "shadow"  # the default: no full-window spikes in stream_step
        x, u = rng_window(0, 3, 20)
        obs = np.ones((3, 20), np.float32)
        obs[:, 15:] = 0
        np.testing.assert_allclose(c.predict(x, u, obs), local.predict(x, u, obs), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(c.predict(x, u), local.predict(x, u), rtol=1e-6, atol=1e-6)
        assert c.last_server_us is not None and c.last_server_us > 0  # server-side handling time per reply
        plan = np.random.default_rng(1).normal(size=(8, 10, 1)).astype(np.float32)
        got = c.rollout(x[0, :6], u[0, :5], plan)
        assert got.shape == (8, 10, 4)
        np.testing.assert_allclose(got, local.rollout(x[0, :6], u[0, :5], plan), rtol=1e-6, atol=1e-6)
        c.stream_reset()
        ref = local.stream(shadow=True)
        for t in range(3 * CONTEXT):  # crosses two re-primings
            xt, ut = np.sin([t * 0.1 + i for i in range(4)]), np.array([np.cos(t * 0.2)])
            np.testing.assert_allclose(c.stream_step(xt, ut), ref.step(xt, ut), rtol=1e-6, atol=1e-6)
        h = c.health()
        assert h["status"] == "ok" and h["requests"]["stream_step"] == 3 * CONTEXT
        assert h["errors_total"] == 0 and h["latency"]["p99_us"] > 0
    with server.client(5000, spin_us=300) as spinning:  # busy-polling client: same answers
        np.testing.assert_allclose(spinning.predict(x, u), local.predict(x, u), rtol=1e-6, atol=1e-6)


def test_stream_reprime_full_mode(models, tmp_path):
    """--stream-reprime full: one full-window call per re-prime; same predictions as the local stream."""
    local = OnnxPredictor(models["a"].full_path, models["a"].step_path)
    ep = f"ipc://{tmp_path}/full.sock"
    with (
        PredictorProcess(models["a"].full_path, ep, extra_args=["--stream-reprime", "full"]) as proc,
        proc.client(5000) as c,
    ):
        assert c.info()["stream_reprime"] == "full"
        c.stream_reset()
        ref = local.stream(shadow=False)
        for t in range(2 * CONTEXT + 3):
            xt, ut = np.cos([t * 0.3 + i for i in range(4)]), np.array([np.sin(t * 0.1)])
            np.testing.assert_allclose(c.stream_step(xt, ut), ref.step(xt, ut), rtol=1e-6, atol=1e-6)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "export.server",
            str(models["a"].full_path),
            "--bind",
            ep,
            "--stream-reprime",
            "lazy",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--stream-reprime" in bad.stderr


def test_bad_requests_get_named_errors_and_server_survives(server):
    with server.client(5000) as c:
        x, u = rng_window(1)
        cases = [
            (lambda: c.predict(x[:, :, :3], u), schema.E_ARRAYS, "x must have shape"),
            (lambda: c.predict(np.where(x > 1, np.nan, x), u), schema.E_VALUE, "NaN"),
            (lambda: c.predict(x, u[:1]), schema.E_ARRAYS, "u must have shape"),
            (lambda: c.request("predict", {"x": x}), schema.E_ARRAYS, "missing ['u']"),
            (lambda: c.request("fly"), schema.E_METHOD, "unknown method 'fly'"),
            (
                lambda: c.request("stream_step", {"x_t": x[0, 0], "u_t": u[0, 0]}, {"stream": "never-reset"}),
                schema.E_STREAM,
                "stream_reset",
            ),
            (lambda: c.rollout(x[0], u[0], np.zeros((2, 500, 1))), schema.E_ARRAYS, "horizon"),
            (lambda: c.reload(str(server.model_path) + ".missing"), schema.E_RELOAD, "not found"),
        ]
        for call, code, text in cases:
            with pytest.raises(PredictorRequestError) as ei:
                call()
            assert ei.value.code == code and text in str(ei.value), (code, str(ei.value))
        # raw frames: wrong version and a float64 array
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        try:
            sock.send_multipart([b"", b'{"v": 99, "id": "a1", "method": "info"}'])
            assert sock.poll(5000)
            rep = schema.decode(sock.recv_multipart())
            assert rep.header["error"]["code"] == schema.E_VERSION and rep.id == "a1"
            decl = b'[{"name":"x","shape":[1],"dtype":"float64"}]'
            hdr = b'{"v":1,"id":"a2","method":"predict","arrays":' + decl + b"}"
            sock.send_multipart([hdr, np.zeros(1).tobytes()])  # no delimiter: reply comes without one too
            assert sock.poll(5000)
            frames = sock.recv_multipart()
            assert frames[0] != b"" and b"float64" in frames[0] and b"bad_arrays" in frames[0]
        finally:
            sock.close(0)
        assert c.predict(x, u).shape == x.shape  # still serving
        assert c.health()["errors_total"] == len(cases) + 2


def test_concurrent_clients_each_get_their_own_answers(server, models):
    local = OnnxPredictor(models["a"].full_path)
    failures: list[str] = []

    def worker(seed: int) -> None:
        try:
            with server.client(10_000) as c:
                for i in range(25):
                    x, u = rng_window(seed * 1000 + i, 1 + i % 3, 5 + seed)
                    got = c.predict(x, u)
                    if not np.allclose(got, local.predict(x, u), rtol=1e-6, atol=1e-6):
                        failures.append(f"client {seed} request {i}: wrong answer")
                c.stream_reset()
                for t in range(10):
                    c.stream_step(np.full(4, seed + t, np.float32), np.zeros(1, np.float32))
                if c.health()["streams"] < 1:
                    failures.append("stream state missing")
        except PredictorError as exc:
            failures.append(f"client {seed}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures


def test_kill9_then_restart_client_recovers(models, tmp_path):
    endpoint = f"ipc://{tmp_path}/crash.sock"
    local = OnnxPredictor(models["a"].full_path, models["a"].step_path)
    proc = PredictorProcess(models["a"].full_path, endpoint).start()
    try:
        c = PredictorClient(endpoint, timeout_ms=300)
        x, u = rng_window(3)
        c.predict(x, u)
        c.stream_reset()
        hist_x, hist_u = [], []
        for t in range(5):
            xt, ut = np.full(4, 0.1 * t, np.float32), np.full(1, -0.1 * t, np.float32)
            c.stream_step(xt, ut)
            hist_x.append(xt)
            hist_u.append(ut)
        proc.kill()  # SIGKILL: no goodbye
        with pytest.raises((PredictorUnavailable, PredictorTimeout)):
            c.predict(x, u)
        with pytest.raises((PredictorUnavailable, PredictorTimeout)):
            c.stream_step(np.full(4, 9.0), np.full(1, 9.0))  # lost step: not part of the history
        proc.start()  # same endpoint
        deadline = time.monotonic() + 20
        while True:
            try:
                got = c.predict(x, u)
                break
            except (PredictorUnavailable, PredictorTimeout):
                assert time.monotonic() < deadline, "client did not recover after the restart"
        np.testing.assert_allclose(got, local.predict(x, u), rtol=1e-6, atol=1e-6)
        # the new server has no stream state: the client re-primes from its local history and retries
        xt, ut = np.full(4, 0.5, np.float32), np.full(1, 0.3, np.float32)
        got = c.stream_step(xt, ut)
        ref = local.stream()
        ref.prime_history(np.stack(hist_x), np.stack(hist_u))
        np.testing.assert_allclose(got, ref.step(xt, ut), rtol=1e-6, atol=1e-6)
        c.close()
    finally:
        proc.stop()


def test_reload_while_hammered_loses_no_request(models, tmp_path):
    a, b = models["a"], models["b"]
    live = tmp_path / "live.onnx"
    shutil.copy(a.full_path, live)
    b_full, b_step = (Path(shutil.copy(f, tmp_path)) for f in (b.full_path, b.step_path))
    local = {name: OnnxPredictor(m.full_path) for name, m in models.items()}
    x, u = rng_window(7, 1, 10)
    want = {name: p.predict(x, u) for name, p in local.items()}
    seen = {"a": 0, "b": 0}
    errors: list[str] = []
    stop = threading.Event()
    with PredictorProcess(live, f"ipc://{tmp_path}/reload.sock") as proc:

        def hammer() -> None:
            with proc.client(10_000) as c:
                while not stop.is_set():
                    try:
                        got = c.predict(x, u)
                    except PredictorError as exc:
                        errors.append(repr(exc))
                        continue
                    match = [n for n in want if np.allclose(got, want[n], rtol=1e-6, atol=1e-6)]
                    if len(match) != 1:
                        errors.append("answer from neither model")
                    else:
                        seen[match[0]] += 1

        th = threading.Thread(target=hammer)
        th.start()
        try:
            time.sleep(0.3)
            with proc.client(30_000) as ctl:
                with pytest.raises(PredictorRequestError, match="outside the reload directory"):
                    ctl.reload(str(b.full_path))  # only files next to the served model may be loaded
                res = ctl.reload(str(b_full), str(b_step))
                assert res["reloaded"] and res["model_sha256"] == local["b"].meta.checkpoint_sha256
                assert res["streaming_graph"]
                assert res["previous_sha256"] == local["a"].meta.checkpoint_sha256
                with pytest.raises(PredictorRequestError, match="reload_failed"):
                    ctl.reload(str(tmp_path / "missing.onnx"))
                time.sleep(0.3)
                # SIGHUP: reload the serving file from disk (now overwritten with model A)
                shutil.copy(a.full_path, tmp_path / "live.tmp")
                (tmp_path / "live.tmp").replace(live)
                assert ctl.reload(str(live))["model_sha256"] == local["a"].meta.checkpoint_sha256
                shutil.copy(b.full_path, tmp_path / "live.tmp")
                (tmp_path / "live.tmp").replace(live)
                proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 20
                while ctl.health()["reloads"] < 3:
                    assert time.monotonic() < deadline, "SIGHUP reload did not happen"
                    time.sleep(0.05)
                assert ctl.info()["model_sha256"] == local["b"].meta.checkpoint_sha256
                time.sleep(0.2)
        finally:
            stop.set()
            th.join(30)
    assert not errors, errors[:5]
    assert seen["a"] > 0 and seen["b"] > 0


def test_refuses_to_hijack_a_live_ipc_endpoint(server, models):
    r = subprocess.run(
        [sys.executable, "-m", "export.server", str(models["b"].full_path), "--bind", server.endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "another process is serving" in r.stderr
    with server.client(5000) as c:
        assert c.info()["pid"] == server.pid  # the first server still owns the endpoint


def test_sigterm_is_graceful(models, tmp_path):
    # through the umbrella CLI: `rigfm serve` (python -m controllers.cli serve)
    proc = PredictorProcess(models["a"].full_path, f"ipc://{tmp_path}/term.sock", use_cli=True).start()
    try:
        with proc.client(5000) as c:
            assert c.info()["n"] == 4
    finally:
        rc = proc.stop()
    assert rc == 0


def test_signal_storm_still_stops_cleanly(models, tmp_path):
    """Signals in quick succession (SIGTERM twice, then SIGINT) end the server with exit 0: the handler only
    sets a flag (a lock taken in a handler deadlocked when a second signal interrupted the first)."""
    proc = PredictorProcess(models["a"].full_path, f"ipc://{tmp_path}/storm.sock").start()
    try:
        with proc.client(5000) as c:
            assert c.info()["n"] == 4
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            proc.send_signal(sig)
        assert proc.proc.wait(timeout=15) == 0
    finally:
        proc.kill()


def test_refuses_bad_model_and_public_bind_without_curve(models, tmp_path):
    run = [sys.executable, "-m", "export.server"]
    r = subprocess.run(
        [*run, str(tmp_path / "nope.onnx"), "--bind", f"ipc://{tmp_path}/x.sock"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "nope.onnx" in r.stderr and "READY" not in r.stdout
    r = subprocess.run(
        [*run, str(models["a"].full_path), "--bind", "tcp://0.0.0.0:5999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "CURVE" in r.stderr and "READY" not in r.stdout


def test_curve_encrypted_loopback(models, tmp_path):
    keys = tmp_path / "keys"
    r = subprocess.run(
        [sys.executable, "-m", "export.server", "--gen-curve-keys", str(keys)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    args = ["--curve-secret-key", str(keys / "server.key_secret")]
    with PredictorProcess(models["a"].full_path, "tcp://127.0.0.1:*", extra_args=args) as proc:
        assert proc.endpoint.startswith("tcp://127.0.0.1:") and not proc.endpoint.endswith("*")
        with PredictorClient(proc.endpoint, 5000, server_public_key=str(keys / "server.key")) as c:
            assert c.info()["n"] == 4
        with PredictorClient(proc.endpoint, 300) as plain, pytest.raises(PredictorUnavailable):
            plain.info()  # no CURVE handshake -> never connected


def test_replies_split_the_servers_time_into_model_call_and_the_rest(server):
    x, u = rng_window(5, b=1)
    with server.client(5000) as c:
        c.info()
        assert c.last_compute_us is None  # no model call
        for call in (lambda: c.predict(x, u), lambda: c.rollout(x[0], u[0], np.zeros((2, 3, 1))),
                     lambda: (c.stream_reset(), c.stream_step(x[0, 0], u[0, 0]))):
            call()
            assert 0 < c.last_compute_us <= c.last_server_us
        with pytest.raises(PredictorRequestError):
            c.predict(x[..., :2], u)  # refused before the model call
        c.health()
        assert c.last_compute_us is None  # after an error reply, a request without a model call has none


class _NoTorchProcess(PredictorProcess):
    """The server started with torch and onnx made unimportable: the deployment side needs neither."""

    def command(self) -> list[str]:
        code = (
            "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
            "from export.server import main; sys.exit(main(sys.argv[1:]))"
        )
        return [sys.executable, "-c", code, self.model_path, "--bind", self.requested_endpoint]


def test_server_runs_without_torch_and_onnx(models, tmp_path):
    proc = _NoTorchProcess(models["a"].full_path, f"ipc://{tmp_path}/notorch.sock")
    with proc, proc.client(5000) as c:
        info = c.info()
        assert info["streaming_graph"]  # step graph found through the metadata, without the onnx package
        assert info["step_cache"] == "buffer"  # the fused export's in-place layout, run without torch/onnx
        c.stream_reset()
        assert c.stream_step(np.zeros(4), np.zeros(1)).shape == (4,)
        x, u = rng_window(9)
        assert c.rollout(x[0], u[0], np.zeros((2, 3, 1))).shape == (2, 3, 4)


def test_predictor_dies_with_its_parent(models):
    """A parent killed without cleanup (os._exit, SIGKILL) leaves no orphaned predictor process."""
    code = (
        "import os, sys; from export.client import PredictorProcess; "
        f"p = PredictorProcess({str(models['a'].full_path)!r}).start(); "
        "print(p.pid, flush=True); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)  # clean up before failing
    pytest.fail("predictor outlived the process that spawned it")
