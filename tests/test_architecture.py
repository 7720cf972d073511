"""The package layering (docs/architecture.md): no import cycles between modules (import-linter checks the
layer and torch contracts in CI; cycles inside a package are checked here with its graph library, grimp)."""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp")

PACKAGES = ("controllers", "hardware", "export", "fm_core", "rigs")


def test_no_module_imports_itself_through_others():
    g = grimp.build_graph(*PACKAGES)
    mods = sorted(m for m in g.modules if m.split(".")[0] in PACKAGES)
    cycles = sorted({tuple(sorted((a, b))) for a in mods for b in g.find_modules_directly_imported_by(a)
                     if b in mods and b != a and g.chain_exists(importer=b, imported=a)})
    assert not cycles, f"import cycles (function-level imports count): {cycles}"


def test_every_rig_the_loop_drives_implements_the_rig_link_protocol():
    """The driver, the lock-step simulator and the dry-run wrapper: same methods and parameter names as
    ``controllers.base.RigLink``; live instances pass the runtime check."""
    import inspect

    import rigs
    from controllers.base import RigLink
    from controllers.safety import DryRunRig
    from controllers.simrig import SimulatedRig
    from hardware.driver import RigConnection

    members = [m for m in ("latest_state", "send_command", "estop", "stats") if hasattr(RigLink, m)]
    assert len(members) == 4
    for cls in (RigConnection, SimulatedRig, DryRunRig):
        for name in members:
            want = list(inspect.signature(getattr(RigLink, name)).parameters)
            got = list(inspect.signature(getattr(cls, name)).parameters)
            assert got[: len(want)] == want, (cls.__name__, name, got)
            assert all(p.default is not inspect.Parameter.empty or p.kind is p.VAR_KEYWORD
                       for p in list(inspect.signature(getattr(cls, name)).parameters.values())[len(want):])
    cfg = rigs.load_config("cartpole")
    sim = SimulatedRig(rigs.RigSimulator(cfg, seed=0), cfg)
    assert isinstance(sim, RigLink) and isinstance(DryRunRig(sim), RigLink)
    assert not isinstance(object(), RigLink)
