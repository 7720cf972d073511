"""A pseudo-terminal that stands in for a USB serial port (the device end of the virtual rig).

The virtual rig owns the pty master; the driver opens the slave path (``/dev/pts/N``) with pyserial
exactly like a real port. ``link`` keeps a stable symlink to the current slave so that a driver that
opened the link path can reconnect after an unplug/replug (a new pty) without knowing the new number.
"""

from __future__ import annotations

import errno
import os
import tty
from pathlib import Path


class PtyPort:
    """Device end of a pty: non-blocking reads/writes on the master, raw mode on the slave.

    Writes never block: when nobody drains the slave (driver not connected), bytes that do not fit
    the kernel buffer are dropped, like a UART transmitting into an unplugged cable."""

    def __init__(self, link: str | os.PathLike | None = None) -> None:
        self.link = Path(link) if link else None
        self.master: int | None = None
        self._slave: int | None = None
        self.path: str | None = None
        self.tx_dropped_bytes = 0
        self.opens = 0

    @property
    def is_open(self) -> bool:
        """Whether the pty currently exists (False between unplug and replug)."""
        return self.master is not None

    def open(self) -> str:
        """Create a new pty (raw mode), point the link at it, and return the slave path."""
        if self.master is not None:
            raise RuntimeError("pty already open")
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self.master, self._slave = master, slave
        self.path = os.ttyname(slave)
        self.opens += 1
        if self.link is not None:
            self.link.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.link.with_name(f".{self.link.name}.{os.getpid()}.tmp")
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(self.path, tmp)
            os.replace(tmp, self.link)  # atomic: a reconnecting driver never sees a missing link
        return self.path

    def close(self) -> None:
        """Unplug: close master and slave; a driver holding the slave gets EIO/EOF. The link is kept."""
        for fd in (self.master, self._slave):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.master = self._slave = None

    def remove_link(self) -> None:
        """Remove the stable symlink if it still points at one of our ptys."""
        if self.link is not None and self.link.is_symlink():
            try:
                self.link.unlink()
            except OSError:
                pass

    def read(self, max_bytes: int = 65536) -> bytes:
        """Return whatever the host has written (possibly b''); never blocks."""
        if self.master is None:
            return b""
        chunks = []
        while True:
            try:
                data = os.read(self.master, max_bytes)
            except BlockingIOError:
                break
            except OSError as exc:  # EIO: no slave open (cannot happen while we hold the slave)
                if exc.errno == errno.EIO:
                    break
                raise
            if not data:
                break
            chunks.append(data)
            if len(data) < max_bytes:
                break
        return b"".join(chunks)

    def write(self, data: bytes) -> int:
        """Write without blocking; bytes that do not fit are dropped and counted. Returns bytes written."""
        if self.master is None or not data:
            if data:
                self.tx_dropped_bytes += len(data)
            return 0
        try:
            n = os.write(self.master, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EAGAIN):
                raise
            n = 0
        self.tx_dropped_bytes += len(data) - n
        return n

    def fileno(self) -> int:
        """The master fd (for select)."""
        if self.master is None:
            raise ValueError("pty is closed")
        return self.master
