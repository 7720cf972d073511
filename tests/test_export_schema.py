"""Wire format of the predictor: round trips, zero-copy decoding, and named errors for bad messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from export import schema


def test_request_round_trip_zero_copy():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    frames = schema.encode_request("predict", "id-1", {"x": x, "u": np.ones((2, 3, 1))}, {"k": 1})
    assert frames[0] == b""
    hdr = json.loads(frames[1])
    assert hdr["v"] == schema.PROTOCOL_VERSION and hdr["arrays"][0] == {"name": "x", "shape": [2, 3, 4],
                                                                          "dtype": "float32"}
    zframes = [zmq.Frame(bytes(memoryview(f))) for f in frames]
    msg = schema.decode_request(zframes)
    assert msg.method == "predict" and msg.id == "id-1" and msg.params == {"k": 1} and msg.delimiter
    np.testing.assert_array_equal(msg.arrays["x"], x)
    assert msg.arrays["u"].dtype == np.float32
    assert not msg.arrays["x"].flags.owndata  # a view on the frame's buffer


def test_reply_and_error_round_trip():
    frames = schema.encode_reply("a", "predict", {"pred": np.zeros((1, 4))}, {"t": 3}, delimiter=False)
    rep = schema.decode(frames)
    assert rep.header["ok"] and rep.header["result"] == {"t": 3} and not rep.delimiter
    err = schema.decode(schema.encode_error("a", schema.E_VALUE, "x contains NaN"))
    assert err.header["ok"] is False
    assert err.header["error"] == {"code": "bad_value", "message": "x contains NaN"}


@pytest.mark.parametrize(
    ("frames", "code", "text"),
    [
        ([b""], schema.E_MALFORMED, "no header"),
        ([b"", b"{nope"], schema.E_MALFORMED, "not UTF-8 JSON"),
        ([b"", b'{"v":1,"method":"info"}'], schema.E_MALFORMED, "'id'"),
        ([b"", b'{"v":2,"id":"q","method":"info"}'], schema.E_VERSION, "version 2"),
        ([b"", b'{"v":1,"id":"q","method":"jump"}'], schema.E_METHOD, "'jump'"),
        ([b"", b'{"v":1,"id":"q","method":"info","params":[]}'], schema.E_PARAMS, "params"),
        ([b"", b'{"v":1,"id":"q","method":"info"}', b"\0"], schema.E_ARRAYS, "0 array(s) but 1"),
        ([b"", b'{"v":1,"id":"q","method":"predict","arrays":[{"name":"x","shape":[3],"dtype":"float32"}]}',
          b"\0" * 8], schema.E_ARRAYS, "needs 12 bytes"),
        ([b"", b'{"v":1,"id":"q","method":"predict","arrays":[{"name":"x","shape":[1],"dtype":"float16"}]}',
          b"\0\0"], schema.E_ARRAYS, "float16"),
        ([b"", b'{"v":1,"id":"q","method":"predict","arrays":[{"name":"x","shape":[-2],"dtype":"float32"}]}',
          b""], schema.E_ARRAYS, "non-negative"),
        ([b"", b'{"v":1,"id":"q","method":"info","x":NaN}'], schema.E_MALFORMED, "JSON"),
        ([b"", b'{"v":1,"id":"q","method":"predict","arrays":[{"name":"x","shape":[1],"dtype":[]}]}',
          b"\0" * 4], schema.E_ARRAYS, "dtype [] not supported"),
        ([b"", b'{"v":1,"id":"q","method":"predict","arrays":[{"name":"x","shape":[1]}]}', b"\0" * 4],
         schema.E_ARRAYS, "dtype None not supported"),
        ([b"", b'{"v":1,"id":"q","method":"predict",'
               b'"arrays":[{"name":"x","shape":[true],"dtype":"float32"}]}',
          b"\0" * 4], schema.E_ARRAYS, "non-negative ints, got [True]"),
        ([b"", b'{"v":1,"id":"q","method":"predict",'
               b'"arrays":[{"name":"x","shape":[1.0],"dtype":"float32"}]}',
          b"\0" * 4], schema.E_ARRAYS, "non-negative ints, got [1.0]"),
        ([b"", b'{"v":1,"id":"q","method":"predict",'
               b'"arrays":[{"name":["x"],"shape":[1],"dtype":"float32"}]}',
          b"\0" * 4], schema.E_ARRAYS, "arrays[0].name must be a non-empty string"),
        ([b"", b'{"v":1,"id":"q","method":"predict","arrays":[{"name":"x","shape":[1],"dtype":"float32"},'
               b'{"name":"x","shape":[1],"dtype":"float32"}]}', b"\0" * 4, b"\0" * 4],
         schema.E_ARRAYS, "'x' declared twice"),
        ([b"", b'{"v":1,"id":"q","method":"predict","arrays":[7]}', b"\0" * 4], schema.E_ARRAYS,
         "arrays[0] must be an object"),
    ],
)
def test_bad_messages_raise_named_schema_errors(frames, code, text):
    with pytest.raises(schema.SchemaError) as ei:
        schema.decode_request(frames)
    assert ei.value.code == code and text in str(ei.value)


def test_require_names_missing_and_unexpected_arrays():
    frames = schema.encode_request("rollout", "r", {"x_hist": np.zeros(2), "zz": np.zeros(1)})
    msg = schema.decode_request(frames)
    with pytest.raises(schema.SchemaError, match=r"missing \['u_hist', 'u_plan'\], unexpected \['zz'\]"):
        schema.require(msg, ("x_hist", "u_hist", "u_plan"))


@pytest.mark.parametrize("req_id", ["r-1", 'quo"te\\', "new\nline\u0001", "é ünï 💡", "x" * 128])
def test_assembled_headers_equal_the_generic_encoder(req_id):
    """encode_request / encode_reply build their JSON from escaped pieces; it must parse to what the generic
    encoder writes, for any id (escaping) and params, and declare the arrays it carries."""
    x = np.arange(6, dtype=np.float64).reshape(1, 2, 3)
    for params in (None, {"stream": 'k"\u00e9'}, {"stream": "k", "other": [1, 2]}, {"stream": 5}):
        frames = schema.encode_request("stream_step", req_id, {"x_t": x, "u_t": np.ones(1)}, params)
        hdr = json.loads(frames[1])
        want = json.loads(schema.encode({"v": 1, "id": req_id, "method": "stream_step",
                                         **({"params": params} if params else {})},
                                        {"x_t": x, "u_t": np.ones(1)})[1])
        assert hdr == want and list(hdr) == list(want)  # same keys, same order
        msg = schema.decode_request([zmq.Frame(bytes(memoryview(f))) for f in frames])
        assert msg.id == req_id and msg.params == (params or {})
        np.testing.assert_array_equal(msg.arrays["x_t"], x.astype(np.float32))
    rep = schema.encode_reply(req_id, "predict", {"pred": x}, {"t": 3, "f": 0.5}, server_us=12.25)
    hdr = json.loads(rep[1])
    assert hdr == {"v": 1, "id": req_id, "method": "predict", "ok": True, "result": {"t": 3, "f": 0.5},
                   "server_us": 12.25, "arrays": [{"name": "pred", "shape": [1, 2, 3], "dtype": "float32"}]}
    assert json.loads(schema.encode_reply(None, None, delimiter=False)[0])["id"] is None


def test_non_finite_values_never_reach_the_wire():
    with pytest.raises(ValueError, match="server_us must be finite"):
        schema.encode_reply("a", "predict", server_us=float("nan"))
    with pytest.raises(ValueError, match="compute_us must be finite"):
        schema.encode_reply("a", "predict", server_us=1.0, compute_us=float("inf"))
    with pytest.raises(ValueError):  # the JSON encoder refuses NaN inside a result
        schema.encode_reply("a", "health", result={"x": float("inf")})


def test_declaration_cache_keys_on_name_and_shape():
    for shape in ((2, 3), (3, 2), (2, 3)):
        hdr = json.loads(schema.encode_request("predict", "i", {"x": np.zeros(shape)})[1])
        assert hdr["arrays"] == [{"name": "x", "shape": list(shape), "dtype": "float32"}]
    hdr = json.loads(schema.encode_request("predict", "i", {"u": np.zeros((2, 3))})[1])
    assert hdr["arrays"][0]["name"] == "u"
