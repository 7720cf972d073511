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
