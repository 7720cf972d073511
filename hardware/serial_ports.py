"""Serial-port discovery and USB-serial latency-timer checks (pyserial, Linux sysfs).

USB-serial adapters (FTDI and friends) buffer received bytes for up to their *latency timer*
(default 16 ms) before handing them to the host: fatal for a 500 Hz control loop. On Linux the
timer is exposed at ``/sys/bus/usb-serial/devices/<ttyUSBn>/latency_timer``; the sysfs root is
injectable so the check is testable without an adapter.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_SYSFS_ROOT = Path("/sys")
MAX_LATENCY_TIMER_MS = 1


class PortNotFound(LookupError):
    """No serial port matches the requested serial number."""


def find_port_by_serial_number(serial_number: str) -> str:
    """Return the device path (e.g. ``/dev/ttyACM0``) of the USB port whose serial number matches.

    Raises PortNotFound listing the serial numbers that were seen."""
    from serial.tools import list_ports

    seen = []
    for info in list_ports.comports():
        if info.serial_number:
            seen.append(f"{info.device}={info.serial_number}")
        if info.serial_number == serial_number:
            return info.device
    raise PortNotFound(
        f"no serial port with USB serial number {serial_number!r}; ports with serial numbers: "
        + (", ".join(seen) if seen else "none")
    )


def latency_timer_ms(port: str, sysfs_root: Path | str = DEFAULT_SYSFS_ROOT) -> int | None:
    """The USB-serial latency timer (ms) of ``port``, or None if it is not a USB-serial adapter.

    Follows symlinks (``/dev/serial/by-id/...`` → ``/dev/ttyUSB0``) and reads
    ``<sysfs_root>/bus/usb-serial/devices/<name>/latency_timer``."""
    name = os.path.basename(os.path.realpath(port))
    path = Path(sysfs_root) / "bus" / "usb-serial" / "devices" / name / "latency_timer"
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        log.warning("unreadable latency timer %r in %s", text, path)
        return None


def check_latency_timer(port: str, sysfs_root: Path | str = DEFAULT_SYSFS_ROOT) -> int | None:
    """Log a warning if ``port`` is a USB-serial adapter with a latency timer above 1 ms.

    Returns the timer value (ms) or None when the port is not a USB-serial adapter."""
    value = latency_timer_ms(port, sysfs_root)
    if value is not None and value > MAX_LATENCY_TIMER_MS:
        name = os.path.basename(os.path.realpath(port))
        log.warning(
            "serial port %s (%s) has a USB latency timer of %d ms (> %d ms): telemetry will arrive in "
            "bursts; fix with: echo 1 | sudo tee /sys/bus/usb-serial/devices/%s/latency_timer",
            port,
            name,
            value,
            MAX_LATENCY_TIMER_MS,
            name,
        )
    return value
