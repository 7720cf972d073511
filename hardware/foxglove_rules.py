"""What Foxglove's (and Lichtblick's) JSON-schema message parser accepts, checked in Python.

The parser (``parseJsonSchema`` of the Studio / Lichtblick ``mcap-support`` package, applied to every
channel with message encoding ``json`` and schema encoding ``jsonschema``) turns a schema into message
definitions and throws on anything else; a channel whose schema throws shows no data in any panel. Its
rules, implemented here:

* the root and every nested object: ``"type": "object"`` (a string) with a ``properties`` mapping;
* a field's ``type`` is one string of ``boolean``, ``string`` (``contentEncoding`` absent or ``base64``),
  ``number``, ``integer``, ``object`` (recursively) or ``array``; ``null``, a list of types (a nullable
  union) or no type at all is rejected;
* an array has an ``items`` schema whose type is ``boolean``, ``string`` (no ``contentEncoding``),
  ``number``, ``integer`` or ``object`` (recursively): an array of arrays is rejected.
"""

from __future__ import annotations

from typing import Any

_SCALARS = ("boolean", "number", "integer")


def schema_problems(schema: Any, name: str = "schema") -> list[str]:
    """Every construct of ``schema`` that Foxglove's JSON-schema parser rejects (empty: it loads)."""
    problems: list[str] = []
    _object(schema, name, problems)
    return problems


def _object(schema: Any, path: str, out: list[str]) -> None:
    if not isinstance(schema, dict) or schema.get("type") != "object":
        got = schema.get("type") if isinstance(schema, dict) else type(schema).__name__
        out.append(f'{path}: expected "type": "object", got {got!r}')
        return
    props = schema.get("properties")
    if not isinstance(props, dict):
        out.append(f"{path}: object without properties")
        return
    for field, fs in props.items():
        _field(fs, f"{path}.{field}", out)


def _field(fs: Any, path: str, out: list[str], item: bool = False) -> None:
    """Check one field schema (``item``: an array's items schema, where strings take no encoding and a
    nested array is rejected)."""
    where = f"{path}[]" if item else path
    if not isinstance(fs, dict):
        what = "array without an items schema" if item else "field schema is not an object"
        out.append(f"{path}: {what}")
        return
    t = fs.get("type")
    if t in _SCALARS:
        return
    if t == "string":
        allowed = (None,) if item else (None, "base64")
        if fs.get("contentEncoding") not in allowed:
            out.append(f"{where}: contentEncoding on array items is not supported" if item
                       else f"{path}: unsupported contentEncoding {fs.get('contentEncoding')!r}")
        return
    if t == "object":
        _object(fs, where, out)
        return
    if t == "array" and not item:
        _field(fs.get("items"), path, out, item=True)
        return
    if item:
        nested = " (nested array)" if t == "array" else ""
        out.append(f"{where}: unsupported array item type {t!r}{nested}")
        return
    why = " (nullable union)" if isinstance(t, list) else ""
    out.append(f"{path}: unsupported field type {t!r}{why}")
