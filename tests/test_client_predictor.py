"""PredictorClient against hand-driven ROUTER sockets: unavailable, timeout, stale replies, error replies;
and the torch-free import rule of the deployment side."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import zmq

from export import PredictorClient, PredictorError, PredictorTimeout, PredictorUnavailable, schema
from export.client import PredictorProcess, PredictorRequestError


@pytest.fixture
def router(tmp_path):
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/fake.sock"
    sock.bind(endpoint)
    yield sock, endpoint
    sock.close(0)


def recv_request(sock: zmq.Socket) -> tuple[bytes, schema.Message]:
    assert sock.poll(5000), "client request did not arrive"
    frames = sock.recv_multipart()
    return frames[0], schema.decode_request(frames[1:])


def test_no_server_raises_unavailable_quickly(tmp_path):
    assert issubclass(PredictorUnavailable, PredictorError) and issubclass(PredictorTimeout, PredictorError)
    with PredictorClient(f"ipc://{tmp_path}/nobody.sock", timeout_ms=50) as c:
        with pytest.raises(PredictorUnavailable, match="no predictor connected"):
            c.info()
    c.close()
    with pytest.raises(PredictorUnavailable, match="closed"):
        c.info()
    with pytest.raises(ValueError, match="timeout_ms"):
        PredictorClient("ipc:///tmp/x", timeout_ms=0)
    with pytest.raises(ValueError, match="spin_us"):
        PredictorClient("ipc:///tmp/x", spin_us=-1)


@pytest.mark.parametrize("spin_us", [0.0, 500.0])
def test_timeout_reconnect_and_stale_reply_discarded(router, spin_us):
    sock, endpoint = router
    with PredictorClient(endpoint, timeout_ms=200, spin_us=spin_us) as c:
        result: dict = {}

        def call() -> None:
            try:
                result["r"] = c.predict(np.zeros((1, 2, 4)), np.zeros((1, 2, 1)))
            except PredictorError as exc:
                result["e"] = exc

        th = threading.Thread(target=call)
        th.start()
        ident, msg = recv_request(sock)  # swallow it: no reply
        th.join(5)
        assert isinstance(result.get("e"), PredictorTimeout) and c.reconnects == 1
        assert msg.method == "predict" and msg.arrays["x"].shape == (1, 2, 4)

        # next request on the new socket: first a stale reply (old id), then the right one
        th = threading.Thread(target=lambda: result.update(info=c.info()))
        th.start()
        ident2, msg2 = recv_request(sock)
        assert ident2 != ident  # a fresh socket after the timeout
        sock.send_multipart([ident2, *schema.encode_reply(msg.id, "predict", {"pred": np.ones((1, 2, 4))})])
        sock.send_multipart([ident2, *schema.encode_reply(msg2.id, "info", result={"n": 4})])
        th.join(5)
        assert result["info"] == {"n": 4} and c.stale_discarded == 1


def test_error_reply_becomes_request_error_with_code(router):
    sock, endpoint = router
    with PredictorClient(endpoint, timeout_ms=2000) as c:
        out: dict = {}

        def call() -> None:
            try:
                c.rollout(np.zeros((3, 4)), np.zeros((3, 1)), np.zeros((2, 5, 1)))
            except PredictorRequestError as exc:
                out["e"] = exc

        th = threading.Thread(target=call)
        th.start()
        ident, msg = recv_request(sock)
        assert set(msg.arrays) == {"x_hist", "u_hist", "u_plan"} and msg.arrays["u_plan"].dtype == np.float32
        sock.send_multipart([ident, *schema.encode_error(msg.id, schema.E_VALUE, "u_plan contains NaN")])
        th.join(5)
        assert out["e"].code == "bad_value" and "u_plan contains NaN" in str(out["e"])


def test_deployment_modules_do_not_import_torch():
    code = (
        "import sys, export, export.client, export.server, export.schema, export.onnx_runtime, "
        "export.export_commands\n"
        "from export import PredictorClient\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported at import time'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_process_that_cannot_start_raises_unavailable_with_its_stderr(tmp_path):
    with pytest.raises(PredictorUnavailable, match=r"code 2 before READY[\s\S]*missing\.onnx"):
        PredictorProcess(tmp_path / "missing.onnx").start()


def _ok(rid: str, method: str, arrays: dict | None = None, result: object = "absent") -> list:
    """An ok reply; ``result`` "absent" leaves the key out, anything else is written as is."""
    frames = schema.encode_reply(rid, method, arrays)
    if result != "absent":
        import json

        hdr = json.loads(frames[1])
        hdr["result"] = result
        frames[1] = json.dumps(hdr).encode()
    return frames


def _raw(header: dict, *frames: bytes) -> list:
    import json

    return [b"", json.dumps(header).encode(), *frames]


x4, u1 = np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 1), np.float32)
MALFORMED_OK = [  # (call, reply to it) : every one must raise PredictorError, never KeyError / TypeError
    ("info", lambda c: c.info(), lambda rid: _ok(rid, "info")),
    ("info-list", lambda c: c.info(), lambda rid: _ok(rid, "info", result=[1, 2])),
    ("health-null", lambda c: c.health(), lambda rid: _ok(rid, "health", result=None)),
    ("reload-str", lambda c: c.reload(), lambda rid: _ok(rid, "reload", result="done")),
    ("reset-no-result", lambda c: c.stream_reset(), lambda rid: _ok(rid, "stream_reset")),
    ("reset-bad-context", lambda c: c.stream_reset(),
     lambda rid: _ok(rid, "stream_reset", result={"t": 0, "context": "many"})),
    ("predict-no-pred", lambda c: c.predict(x4, u1), lambda rid: _ok(rid, "predict")),
    ("predict-other-name", lambda c: c.predict(x4, u1),
     lambda rid: _ok(rid, "predict", {"prediction": np.zeros((1, 2, 4))})),
    ("predict-shape", lambda c: c.predict(x4, u1), lambda rid: _ok(rid, "predict", {"pred": np.zeros(3)})),
    ("predict-nan", lambda c: c.predict(x4, u1),
     lambda rid: _ok(rid, "predict", {"pred": np.full((1, 2, 4), np.nan)})),
    ("rollout-shape", lambda c: c.rollout(np.zeros((3, 4)), np.zeros((3, 1)), np.zeros((2, 5, 1))),
     lambda rid: _ok(rid, "rollout", {"pred": np.zeros((2, 4, 4))})),
    ("error-not-object", lambda c: c.info(),
     lambda rid: _raw({"v": 1, "id": rid, "ok": False, "error": "boom", "arrays": []})),
    ("ok-string", lambda c: c.info(),
     lambda rid: _raw({"v": 1, "id": rid, "ok": "yes", "result": {}, "arrays": []})),
    ("float64", lambda c: c.predict(x4, u1),
     lambda rid: _raw({"v": 1, "id": rid, "ok": True,
                       "arrays": [{"name": "pred", "shape": [1, 2, 4], "dtype": "float64"}]},
                      np.zeros((1, 2, 4)).tobytes())),
]


@pytest.mark.parametrize(("name", "call", "reply"), MALFORMED_OK, ids=[m[0] for m in MALFORMED_OK])
def test_malformed_ok_replies_raise_predictor_error(router, name, call, reply):
    """A real REP-side ROUTER socket answers each request with a malformed reply (issue 22 item 7: the
    client raised KeyError 'result' / 'pred', which the controllers' fallback does not catch)."""
    sock, endpoint = router
    with PredictorClient(endpoint, timeout_ms=5000) as c:
        out: dict = {}

        def run() -> None:
            try:
                out["value"] = call(c)
            except BaseException as exc:  # noqa: BLE001 - the test inspects the type
                out["exc"] = exc

        th = threading.Thread(target=run)
        th.start()
        ident, msg = recv_request(sock)
        sock.send_multipart([ident, *reply(msg.id)])
        th.join(10)
        assert isinstance(out.get("exc"), PredictorError), out
        assert not isinstance(out["exc"], PredictorTimeout)


def test_malformed_stream_step_reply_marks_the_stream_for_repriming(router):
    sock, endpoint = router
    with PredictorClient(endpoint, timeout_ms=5000) as c:
        out: dict = {}

        def run() -> None:
            try:
                c.stream_step(np.zeros(4), np.zeros(1))
            except BaseException as exc:  # noqa: BLE001
                out["exc"] = exc

        th = threading.Thread(target=run)
        th.start()
        ident, msg = recv_request(sock)
        sock.send_multipart([ident, *_ok(msg.id, "stream_step", {"pred": np.zeros(2)}, result={"t": 1})])
        th.join(10)
        assert isinstance(out.get("exc"), PredictorError) and "shape" in str(out["exc"])
        assert c._stream_dirty  # the server took the step: the next call re-primes from the client's history
