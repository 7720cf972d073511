"""`rigfm virtual-rig cartpole|furuta`: a simulated rig behind a real pseudo-terminal (cheap to import)."""

from __future__ import annotations

import argparse

from hardware.virtual_rig_args import add_virtual_rig_arguments


def register(subparsers) -> None:
    """Add `virtual-rig` to the umbrella parser."""
    p = subparsers.add_parser(
        "virtual-rig",
        help="run a simulated rig on a pseudo-terminal (prints 'PORT /dev/pts/N' first)",
        description="Run a simulated cart-pole or Furuta rig with firmware semantics on a pseudo-terminal. "
        "The first stdout line is 'PORT <path>'; runs until killed (SIGTERM/SIGINT). SIGUSR1 unplugs the "
        "virtual USB cable; SIGUSR2 quiesces the output (flush, final clean frame, stop transmitting).",
    )
    add_virtual_rig_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from hardware.virtual_rig import run_virtual_rig

    return run_virtual_rig(args)
