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
