"""The packages' lazy public names (rigs.lazy.lazy_exports) resolve to the objects of their modules."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["rigs", "fm_core", "hardware", "export"])
def test_every_public_name_resolves_to_its_module_object(package):
    pkg = importlib.import_module(package)
    assert pkg.__all__ == sorted(pkg.__all__) and pkg.__all__
    for name in pkg.__all__:
        obj = getattr(pkg, name)
        assert getattr(importlib.import_module(obj.__module__), name) is obj
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'no_such_name'"):
        pkg.no_such_name  # noqa: B018
