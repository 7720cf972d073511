"""Fuzz the predictor with random and malformed multipart messages (10^4 in the normal run, 10^5 in a slow
test): every one gets an error reply with the right code, the server never dies, its RSS grows by < 50 MB,
and it still answers a valid request bit-identically afterwards."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zmq

from export import schema
from export.client import PredictorProcess
from export.onnx_export import export_checkpoint, save_random_checkpoint

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "max_len": 32}
N_MESSAGES = 10_000
N_SLOW = 100_000
KINDS = 20
RSS_GROWTH_MB = 50


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    ck = save_random_checkpoint(d / "f.pt", config=TINY)
    return export_checkpoint(ck, d / "f.onnx", context=8, streaming=d / "f_step.onnx").full_path


def _hdr(rng: np.random.Generator, **over) -> dict:
    h = {"v": 1, "id": f"r{rng.integers(1 << 30)}", "method": str(rng.choice(schema.METHODS))}
    h.update(over)
    return h


def malformed(rng: np.random.Generator, i: int) -> list[bytes]:
    """One bad message (frames after the DEALER's identity); the kind cycles through many corruptions."""
    kind, j = i % KINDS, i // KINDS  # j picks the variant within a kind
    delim = [b""] if rng.uniform() < 0.7 else []
    if kind == 0:  # random bytes frames
        return delim + [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 5)))]
    if kind == 1:  # not UTF-8
        return delim + [b"\xff\xfe" + rng.bytes(8)]
    if kind == 2:  # JSON but not an object
        return delim + [json.dumps([1, 2, 3]).encode()]
    if kind == 3:  # wrong version
        return delim + [json.dumps(_hdr(rng, v=int(rng.integers(2, 100)))).encode()]
    if kind == 4:  # unknown method
        return delim + [json.dumps(_hdr(rng, method="m" + rng.bytes(4).hex())).encode()]
    if kind == 5:  # missing / bad id
        bad_id = [None, 5, "", "x" * 500][j % 4]
        return delim + [json.dumps({"v": 1, "method": "info", "id": bad_id}).encode()]
    if kind == 6:  # declared arrays but no frames
        h = _hdr(rng, method="predict", arrays=[{"name": "x", "shape": [1, 2, 4], "dtype": "float32"}])
        return delim + [json.dumps(h).encode()]
    if kind == 7:  # frame size does not match the shape
        h = _hdr(rng, method="predict", arrays=[{"name": "x", "shape": [1, 2, 4], "dtype": "float32"}])
        return delim + [json.dumps(h).encode(), rng.bytes(int(rng.integers(0, 31)))]
    if kind == 8:  # wrong dtype
        h = _hdr(rng, method="predict", arrays=[{"name": "x", "shape": [2], "dtype": "int64"}])
        return delim + [json.dumps(h).encode(), np.zeros(2, np.int64).tobytes()]
    if kind == 9:  # negative / absurd / non-int shapes
        shape = [[-1], [1 << 40, 1 << 40], ["a"], [1.5], [1, 1, 1, 1, 1, 1], True][j % 6]
        h = _hdr(rng, method="predict", arrays=[{"name": "x", "shape": shape, "dtype": "float32"}])
        return delim + [json.dumps(h).encode(), b"\0" * 4]
    if kind == 10:  # right framing, wrong shapes for the method
        x = rng.normal(size=(1, 3, int(rng.integers(1, 8)))).astype(np.float32)
        u = rng.normal(size=(1, int(rng.integers(1, 4)), 2)).astype(np.float32)
        return schema.encode_request("predict", f"s{i}", {"x": x, "u": u})
    if kind == 11:  # NaN / Inf payloads
        x = np.full((1, 3, 4), [np.nan, np.inf, -np.inf][j % 3], np.float32)
        return schema.encode_request("predict", f"n{i}", {"x": x, "u": np.zeros((1, 3, 1), np.float32)})
    if kind == 12:  # wrong array names / extra arrays
        return schema.encode_request("rollout", f"w{i}", {"q": np.zeros(3, np.float32)})
    if kind == 13:  # params of the wrong type / reload paths outside the model folder
        bad_path = [12, "bad\0path", "/etc/passwd", "../../x"][(j // 2) % 4]
        h = _hdr(rng, method="reload", params={"model": bad_path})
        h = h if j % 2 else _hdr(rng, params=[1])
        return delim + [json.dumps(h).encode()]
    if kind == 14:  # deeply nested JSON / huge header
        return delim + [b"[" * 5000 + b"]" * 5000] if j % 2 else delim + [b"{" + b" " * (70 * 1024) + b"}"]
    if kind == 16:  # finite but extreme values (issue 22: 3e38 gave NaN with an ok reply)
        v = [3e38, -3e38, 1e7, 1.5e6][j % 4]
        x = np.full((1, 3, 4), v, np.float32)
        return schema.encode_request("predict", f"e{i}", {"x": x, "u": np.zeros((1, 3, 1), np.float32)})
    if kind == 17:  # obs out of [0, 1]
        obs = np.full((1, 3), [-5.0, 2.0, np.nan][j % 3], np.float32)
        return schema.encode_request("predict", f"o{i}", {"x": np.zeros((1, 3, 4), np.float32),
                                                          "u": np.zeros((1, 3, 1), np.float32), "obs": obs})
    if kind == 18:  # beyond the element budget: a rollout of K x (L-1+H) > 65536 window steps
        k = int(rng.integers(2200, 4097))  # x 31 steps (L 8, H 24) > 65536
        return schema.encode_request("rollout", f"b{i}", {"x_hist": np.zeros((8, 4), np.float32),
                                                          "u_hist": np.zeros((8, 1), np.float32),
                                                          "u_plan": np.zeros((k, 24, 1), np.float32)})
    if kind == 19:  # too many frames (dropped past the limit by the server's receive)
        return delim + [json.dumps(_hdr(rng, method="info")).encode()] + [b"x"] * int(rng.integers(12, 200))
    # kind 15: too many frames, empty frames, stream_step without reset
    if j % 2:
        return delim + [json.dumps(_hdr(rng, method="info")).encode()] + [b""] * int(rng.integers(1, 20))
    return schema.encode_request("stream_step", f"t{i}", {"x_t": np.zeros(4, np.float32),
                                                          "u_t": np.zeros(1, np.float32)})


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


CHECK_X = np.random.default_rng(7).normal(size=(1, 4, 4)).astype(np.float32)
CHECK_U = np.random.default_rng(8).normal(size=(1, 4, 1)).astype(np.float32)


def run_fuzz(model: str, tmp_path, n_messages: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with PredictorProcess(model, f"ipc://{tmp_path}/fuzz.sock") as proc:
        with proc.client(5000) as c:
            check = np.array(c.predict(CHECK_X, CHECK_U))  # the answer every later check must repeat
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(proc.endpoint)
        replies = 0
        codes: dict[str, int] = {}
        rss: list[float] = []
        try:
            t0 = time.monotonic()
            batch = 250
            for start in range(0, n_messages, batch):
                if start == 2000:  # after warm-up (every kind's code path, allocator pools filled)
                    rss.append(rss_mb(proc.pid))
                for i in range(start, start + batch):
                    sock.send_multipart(malformed(rng, i))
                for _ in range(batch):
                    assert sock.poll(10_000), f"no reply after {replies} replies (server dead?)"
                    frames = sock.recv_multipart()
                    _, body = schema.split_envelope(frames)
                    hdr = json.loads(body[0])
                    assert hdr["ok"] is False and hdr["v"] == 1, hdr
                    assert hdr["error"]["message"], hdr
                    codes[hdr["error"]["code"]] = codes.get(hdr["error"]["code"], 0) + 1
                    replies += 1
                if (start // batch) % 40 == 39:  # every 10,000 messages: still the same answer
                    with proc.client(5000) as c:
                        np.testing.assert_array_equal(c.predict(CHECK_X, CHECK_U), check)
            assert proc.proc.poll() is None, "server died"
            elapsed = time.monotonic() - t0
            rss.append(rss_mb(proc.pid))
        finally:
            sock.close(0)
        assert replies == n_messages
        assert {schema.E_MALFORMED, schema.E_VERSION, schema.E_METHOD, schema.E_ARRAYS, schema.E_VALUE,
                schema.E_PARAMS, schema.E_STREAM, schema.E_TOO_LARGE} <= set(codes), codes
        assert schema.E_INTERNAL not in codes, codes  # every bad input was recognised as such
        with proc.client(5000) as c:
            np.testing.assert_array_equal(c.predict(CHECK_X, CHECK_U), check)
            assert c.health()["errors_total"] == n_messages
        growth = rss[-1] - rss[0]
        print(f"fuzz: {n_messages} messages in {elapsed:.2f} s, server RSS {rss[0]:.1f} -> {rss[-1]:.1f} MB "
              f"(+{growth:.1f}), codes {codes}")
        assert growth < RSS_GROWTH_MB, rss


def test_fuzz_every_message_gets_an_error_reply(model, tmp_path):
    run_fuzz(model, tmp_path, N_MESSAGES, 1234)


@pytest.mark.slow
def test_fuzz_1e5_messages_bounded_memory(model, tmp_path):
    run_fuzz(model, tmp_path, N_SLOW, 4321)
