"""Bind endpoints parsed the way ZeroMQ parses them, to tell loopback from exposed addresses. Torch-free.

libzmq's TCP address resolver takes the port from after the **last** ``:`` (``atoi``: trailing garbage is
ignored) and binds the host that stands before it; ``[...]`` brackets an IPv6 literal and a ``;`` separates
a source address (connect syntax). A URL parser reads ``tcp://0.0.0.0:47818@127.0.0.1`` as user
``0.0.0.0:47818`` at host ``127.0.0.1``, while ZeroMQ binds ``0.0.0.0`` (all interfaces), port 47818: the
guard must read the host as ZeroMQ does, and it refuses what it cannot read unambiguously.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

TRANSPORTS = ("tcp", "ipc", "inproc")
WILDCARDS = ("*", "0.0.0.0", "::")
_PORT = re.compile(r"\*|[0-9]{1,5}")
_HOST = re.compile(r"[A-Za-z0-9._*-]+")  # an IPv4 literal, '*', an interface name


class EndpointError(ValueError):
    """A bind endpoint that is malformed or names an unsupported transport (one line, names the fix)."""


@dataclass(frozen=True)
class Endpoint:
    """A parsed bind endpoint: ``host`` is what ZeroMQ binds (brackets stripped), ``port`` as written."""

    text: str
    transport: str
    host: str = ""
    port: str = ""
    ipv6: bool = False

    @property
    def local(self) -> bool:
        """ipc://, inproc:// and tcp:// on a loopback address (127.0.0.0/8, ::1, ``localhost``)."""
        if self.transport != "tcp":
            return True
        if self.host == "localhost":  # bind resolves no DNS: an interface of that name or a failed bind
            return True
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return False  # '*', interface names ('eth0', even 'lo'): treated as exposed
        mapped = getattr(ip, "ipv4_mapped", None)
        return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))

    @property
    def wildcard(self) -> bool:
        return self.transport == "tcp" and self.host in WILDCARDS


def parse_bind(text: str) -> Endpoint:
    """Parse a ``--bind`` endpoint like ZeroMQ; raises EndpointError naming what is wrong."""
    usage = "expected ipc:///path, tcp://127.0.0.1:PORT, tcp://[::1]:PORT or inproc://name"
    if not isinstance(text, str) or "://" not in text:
        raise EndpointError(f"--bind {text!r}: {usage}")
    if any(c.isspace() or ord(c) < 32 for c in text):
        raise EndpointError(f"--bind {text!r}: contains whitespace or control characters")
    transport, rest = text.split("://", 1)
    if transport not in TRANSPORTS:
        raise EndpointError(f"--bind {text!r}: transport {transport!r} not supported ({usage})")
    if transport != "tcp":
        if not rest:
            raise EndpointError(f"--bind {text!r}: empty {transport} address ({usage})")
        return Endpoint(text, transport)
    if ";" in rest:
        raise EndpointError(f"--bind {text!r}: ';' (a source address) is connect syntax, not for a bind")
    host, sep, port = rest.rpartition(":")  # ZeroMQ: the port follows the LAST ':'
    if not sep or not host:
        raise EndpointError(f"--bind {text!r}: expected tcp://HOST:PORT")
    ipv6 = False
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")) or len(host) < 3:
            raise EndpointError(f"--bind {text!r}: unbalanced '[...]' around an IPv6 address")
        host, ipv6 = host[1:-1], True
        try:
            if ipaddress.ip_address(host.split("%", 1)[0]).version != 6:
                raise ValueError(host)
        except ValueError:
            raise EndpointError(f"--bind {text!r}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:  # ZeroMQ also reads an unbracketed IPv6 literal before the last ':'
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise EndpointError(f"--bind {text!r}: host {host!r} is not an IPv6 address") from None
        ipv6 = True
    elif not _HOST.fullmatch(host):
        raise EndpointError(f"--bind {text!r}: host {host!r} is not an IP address, '*' or an interface name")
    return Endpoint(text, "tcp", host, port, ipv6)


def check_port(ep: Endpoint) -> None:
    """A tcp port must be ``*`` or 1..65535, nothing after it (ZeroMQ would ignore trailing text)."""
    if ep.transport != "tcp":
        return
    if not _PORT.fullmatch(ep.port) or (ep.port != "*" and not 1 <= int(ep.port) <= 65535):
        raise EndpointError(f"--bind {ep.text!r}: port {ep.port!r} must be 1..65535 or '*'")
