"""Options of `rigfm virtual-rig` and `python -m hardware.virtual_rig`, declared once (argparse only)."""

from __future__ import annotations

import argparse

from fm_core.cli_types import SEED, add_set_option, finite_float, int_range


def add_virtual_rig_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `rigfm virtual-rig` and `python -m hardware.virtual_rig`."""
    p.add_argument("rig", help="rig config name (cartpole, furuta) or path to a rig TOML file")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the plant noise and of the fault injection")
    p.add_argument("--init", choices=("hanging", "upright"), default="hanging", help="initial pendulum state")
    add_set_option(p, "physics override passed to rigs.RigSimulator, e.g. --set pole_mass_scale=1.4",
                   number=True, drop_section="plant")
    p.add_argument(
        "--link",
        default=None,
        metavar="PATH",
        help="keep a stable symlink PATH -> current pty (reconnect by path after a replug)",
    )
    p.add_argument(
        "--telemetry-divider",
        type=int_range(1, 1000),
        default=None,
        metavar="K",
        help="default STATE divider: every K-th loop tick (protocol default 1 = every tick; the driver "
        "configures loop rate / control rate after connecting)",
    )
    p.add_argument("--ber", type=finite_float(0, 1), default=0.0,
                   help="bit error rate on the device->host byte stream")
    p.add_argument(
        "--drop-rate", type=finite_float(0, 1), default=0.0,
        help="probability of dropping each transmitted byte"
    )
    p.add_argument(
        "--garbage-rate",
        type=finite_float(0, 1e6, unit="Hz"),
        default=0.0,
        metavar="HZ",
        help="mean rate of random garbage bursts injected between frames",
    )
    p.add_argument("--latency-ms", type=finite_float(0, 10_000, unit="ms"), default=0.0,
                   help="added device->host latency (ms)")
    p.add_argument(
        "--faults-from-start",
        action="store_true",
        help="inject faults from the first byte (default: from the first CONFIG, so the handshake is clean)",
    )
    p.add_argument(
        "--disconnect-after",
        type=finite_float(0, 1e7, unit="s"),
        default=None,
        metavar="S",
        help="unplug (close the pty) S seconds after start; SIGUSR1 unplugs at any time",
    )
    p.add_argument(
        "--replug-after",
        type=finite_float(None, 1e7, unit="s"),
        default=0.5,
        metavar="S",
        help="after an unplug, open a new pty (and update --link) after S seconds; <0: never",
    )
    p.add_argument(
        "--stats",
        default=None,
        metavar="FILE",
        help="write JSON statistics (incl. injected corruption) here periodically and on exit",
    )
    p.add_argument(
        "--voltage-log",
        default=None,
        metavar="FILE",
        help="append '<monotonic ns> <applied V> <ns of the last COMMAND> <watchdog tripped>' to FILE each "
        "time the applied voltage turns zero or non-zero (when the motor really stopped)",
    )
    p.add_argument("--duration", type=finite_float(0, 1e7, lo_open=True, unit="s"), default=None, metavar="S",
                   help="exit after S seconds")
