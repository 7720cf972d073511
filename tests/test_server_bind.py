"""The bind guard reads endpoints as ZeroMQ does (issue 22 items 1, 5, 6): a table of bind addresses through
the parser and through the real ``rigfm serve`` process (python -m controllers.cli serve), and the CURVE
secret key's file mode."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from export.client import PredictorClient, PredictorProcess
from export.endpoint import EndpointError, check_port, parse_bind
from export.onnx_export import export_checkpoint, save_random_checkpoint
from export.server import is_local_endpoint

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "max_len": 32}

# endpoint -> (host ZeroMQ binds, local?) ; None: malformed (a named EndpointError)
TABLE = [
    ("ipc:///tmp/rigfm.sock", (None, True)),
    ("ipc://@abstract-name", (None, True)),
    ("inproc://x", (None, True)),
    ("tcp://127.0.0.1:5555", ("127.0.0.1", True)),
    ("tcp://127.0.0.1:*", ("127.0.0.1", True)),
    ("tcp://127.8.9.10:5555", ("127.8.9.10", True)),
    ("tcp://localhost:5555", ("localhost", True)),
    ("tcp://[::1]:5555", ("::1", True)),
    ("tcp://[::1]:*", ("::1", True)),
    ("tcp://::1:5555", ("::1", True)),  # ZeroMQ takes the host before the last ':'
    ("tcp://[::ffff:127.0.0.1]:5555", ("::ffff:127.0.0.1", True)),
    ("tcp://*:5555", ("*", False)),
    ("tcp://0.0.0.0:5555", ("0.0.0.0", False)),
    ("tcp://[::]:5555", ("::", False)),
    ("tcp://192.168.1.5:5555", ("192.168.1.5", False)),
    ("tcp://eth0:5555", ("eth0", False)),
    ("tcp://lo:5555", ("lo", False)),  # an interface name: treated as exposed
    ("tcp://0.0.0.0:47818@127.0.0.1", ("0.0.0.0", False)),  # the '@' trick of issue 22
    ("tcp://127.0.0.1@0.0.0.0:47818", None),  # '@' in the host: not an address ZeroMQ binds as loopback
    ("tcp://user@127.0.0.1:5555", None),
    ("tcp://[::1", None),
    ("tcp://[::1]", None),
    ("tcp://::1]:5555", None),
    ("tcp://[127.0.0.1]:5555", None),
    ("tcp://127.0.0.1", None),
    ("tcp://:5555", None),
    ("tcp://0.0.0.0:5;127.0.0.1:6", None),
    ("tcp://127.0.0.1:55 55", None),
    ("tcp://127.0.0.1:5555\n", None),
    ("ipc://", None),
    ("udp://127.0.0.1:5555", None),
    ("ws://127.0.0.1:5555", None),
    ("127.0.0.1:5555", None),
    ("", None),
]


@pytest.mark.parametrize(("endpoint", "want"), TABLE, ids=[repr(e) for e, _ in TABLE])
def test_bind_table_parses_like_zeromq(endpoint, want):
    if want is None:
        with pytest.raises(EndpointError, match="--bind"):
            parse_bind(endpoint)
        assert not is_local_endpoint(endpoint)
        return
    ep = parse_bind(endpoint)
    host, local = want
    if host is not None:
        assert ep.host == host
    assert ep.local is local and is_local_endpoint(endpoint) is local


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://0.0.0.0:4@1.1.1.1",
                                      "tcp://127.0.0.1:12x"])
def test_ports_are_checked(endpoint):
    with pytest.raises(EndpointError, match="port"):
        check_port(parse_bind(endpoint))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("bind")
    ck = save_random_checkpoint(d / "b.pt", config=TINY)
    return str(export_checkpoint(ck, d / "b.onnx", context=8).full_path)


def serve(model: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``rigfm serve`` that must refuse to start (a READY line would leave it serving: timeout kills it)."""
    return subprocess.run([sys.executable, "-m", "controllers.cli", "serve", model, *args],
                          capture_output=True, text=True, timeout=60)


def assert_named_refusal(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "READY" not in r.stdout and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rigfm serve: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize(
    ("endpoint", "words"),
    [
        ("tcp://0.0.0.0:47818@127.0.0.1", ("refusing", "'0.0.0.0'", "CURVE")),  # issue 22 item 1
        ("tcp://*:*", ("refusing", "all interfaces")),
        ("tcp://[::]:*", ("refusing", "all interfaces")),
        ("tcp://[::1", ("unbalanced",)),  # issue 22 item 5: was a ValueError traceback, exit 1
        ("tcp://127.0.0.1", ("tcp://HOST:PORT",)),
        ("garbage://x", ("transport",)),
        ("tcp://127.0.0.1:99999", ("port",)),
        ("nonsense", ("--bind",)),
    ],
)
def test_rigfm_serve_refuses_exposed_and_malformed_binds(model, endpoint, words):
    assert_named_refusal(serve(model, "--bind", endpoint), *words)


def test_insecure_warns_and_at_trick_still_refused_by_its_port(model):
    r = serve(model, "--bind", "tcp://0.0.0.0:47818@127.0.0.1", "--insecure")
    assert r.returncode == 2 and "READY" not in r.stdout and "Traceback" not in r.stderr, r.stderr
    assert "WARNING: --insecure" in r.stderr and "port '47818@127.0.0.1'" in r.stderr


def test_insecure_wildcard_serves_with_a_warning(model):
    with PredictorProcess(model, "tcp://*:*", extra_args=["--insecure"], use_cli=True) as proc:
        deadline = time.monotonic() + 10  # stderr is read by a thread of its own
        while not any("WARNING: --insecure" in ln and "all interfaces" in ln for ln in proc.stderr_lines):
            assert time.monotonic() < deadline, list(proc.stderr_lines)
            time.sleep(0.02)
        port = proc.endpoint.rsplit(":", 1)[1]
        with PredictorClient(f"tcp://127.0.0.1:{port}", 5000) as c:
            assert c.info()["n"] == 4


def test_ipv6_loopback_serves(model):
    with PredictorProcess(model, "tcp://[::1]:*", use_cli=True) as proc:
        assert proc.endpoint.startswith("tcp://[::1]:")
        with PredictorClient(proc.endpoint, 5000) as c:
            assert c.info()["n"] == 4
    assert not any("WARNING" in line for line in proc.stderr_lines)


def test_gen_curve_keys_writes_the_secret_key_0600(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "server.key_secret").write_text("old")  # an existing file keeps its mode under open(): chmod'ed
    os.chmod(keys / "server.key_secret", 0o644)
    r = subprocess.run([sys.executable, "-m", "controllers.cli", "serve", "--gen-curve-keys", str(keys)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(keys / "server.key_secret").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys / "server.key").st_mode) == 0o644  # the public key is for clients
    fresh = tmp_path / "n"
    r = subprocess.run([sys.executable, "-m", "controllers.cli", "serve", "--gen-curve-keys", str(fresh)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and stat.S_IMODE(os.stat(fresh / "server.key_secret").st_mode) == 0o600
