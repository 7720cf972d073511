"""Argparse ``type=`` helpers that validate numbers at parse time: finite, in range, the range in the message.

One copy for every ``rigfm`` command (it lives at the bottom layer so ``fm_core``, ``rigs``, ``hardware``,
``export`` and ``controllers`` can all use it; stdlib only)::

    p.add_argument("--rate", type=finite_float(0, 10_000, lo_open=True, unit="Hz"), default=500.0)
    p.add_argument("--runs", type=int_range(1, 1_000_000), default=40)
    add_set_option(p, "plant parameter, e.g. pole_mass_scale=1.4", number=True)

``--rate 0`` / ``nan`` / ``inf`` / ``1e9`` / ``abc`` then end in argparse's usage error (exit 2) with
``argument --rate: must be a finite number in (0, 10000] Hz, got '0'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
from collections.abc import Callable


def describe_range(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False,
                   unit: str = "") -> str:
    """``in [lo, hi]``, ``>= lo``, ``< hi`` ... with the unit appended."""
    def fmt(v: float) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    if lo is not None and hi is not None:
        text = f"in {'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {fmt(lo)}"
    elif hi is not None:
        text = f"{'<' if hi_open else '<='} {fmt(hi)}"
    else:
        text = "finite"
    return f"{text} {unit}".rstrip()


def _in_range(v: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (v < lo or (lo_open and v == lo)):
        return False
    return not (hi is not None and (v > hi or (hi_open and v == hi)))


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, unit: str = "") -> Callable[[str], float]:
    """An argparse type: a finite float in the given range (NaN, +-inf and out-of-range values refused)."""
    rng = describe_range(lo, hi, lo_open, hi_open, unit)

    def parse(text: str) -> float:
        try:
            v = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be a number {rng}, got {text!r}") from None
        if not math.isfinite(v) or not _in_range(v, lo, hi, lo_open, hi_open):
            raise argparse.ArgumentTypeError(f"must be a finite number {rng}, got {text!r}")
        return v

    parse.__name__ = "finite_float"
    return parse


def int_range(lo: int | None = None, hi: int | None = None, *, unit: str = "") -> Callable[[str], int]:
    """An argparse type: an integer (decimal, or 0x.. hex) in ``[lo, hi]``."""
    rng = describe_range(lo, hi, unit=unit)

    def parse(text: str) -> int:
        try:
            v = int(text, 0) if text.strip().lower().startswith(("0x", "-0x")) else int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be an integer {rng}, got {text!r}") from None
        if not _in_range(v, lo, hi, False, False):
            raise argparse.ArgumentTypeError(f"must be an integer {rng}, got {text!r}")
        return v

    parse.__name__ = "int_range"
    return parse


def comma_list(item: Callable[[str], object] = str, what: str = "names") -> Callable[[str], list]:
    """An argparse type: ``a,b,c`` -> ``[item(a), item(b), item(c)]`` (blanks dropped, at least one)."""

    def parse(text: str) -> list:
        try:
            values = [item(v.strip()) for v in text.split(",") if v.strip()]
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values

    parse.__name__ = "comma_list"
    return parse


def parse_value(raw: str) -> object:
    """A ``--set`` value in TOML syntax (``3``, ``1e-3``, ``true``, ``[30, 50]``); a bare word is a string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return raw.strip()


def split_kv(item: str, option: str = "--set", number: bool = False) -> tuple[str, object]:
    """``KEY=VALUE`` -> ``(key, value)`` (:func:`parse_value`); ``number``: VALUE must be a finite number.
    ``ValueError`` names the option and the item."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{option} {item!r}: expected KEY=VALUE")
    value = parse_value(raw)
    if number:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{option} {item!r}: value {raw.strip()!r} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"{option} {item!r}: value {raw.strip()!r} is not finite")
        value = float(value)
    return key, value


def parse_kv(items: list[str], option: str = "--set", number: bool = False) -> dict[str, object]:
    """``KEY=VALUE`` items -> {key: value} (:func:`split_kv`; a later item wins)."""
    return dict(split_kv(item, option, number) for item in items)


def key_value(option: str = "--set", number: bool = False, sections: tuple[str, ...] = (),
              drop_section: str = "") -> Callable[[str], tuple[str, object]]:
    """An argparse type for ``KEY=VALUE`` -> ``(key, value)`` (:func:`split_kv`); with ``sections`` the key
    must be ``SECTION.NAME`` with one of those sections; with ``drop_section`` a key spelled
    ``drop_section.NAME`` is read as ``NAME`` (so ``plant.pole_mass_scale``, as ``rigfm run`` spells it, works
    where the keys are bare)."""

    def parse(text: str) -> tuple[str, object]:
        try:
            key, value = split_kv(text, option, number)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if drop_section and key.startswith(drop_section + "."):
            key = key[len(drop_section) + 1:]
        head, _, name = key.partition(".")
        if sections and (head not in sections or not name):
            raise argparse.ArgumentTypeError(
                f"{option} {text!r}: the key must be SECTION.NAME with SECTION one of {', '.join(sections)}")
        return key, value

    parse.__name__ = "key_value"
    return parse


def add_set_option(p: argparse.ArgumentParser, help: str, *, number: bool = False,
                   sections: tuple[str, ...] = (), drop_section: str = "", parse: bool = True) -> None:
    """The one ``KEY=VALUE`` override option of every ``rigfm`` command: ``--set`` (repeatable), into
    ``args.overrides``: ``(key, value)`` pairs (``parse=False``: the raw strings, for commands that hand them
    on to a config loader or a child process; ``drop_section``: see :func:`key_value`)."""
    metavar = "SECTION.KEY=VALUE" if sections else "KEY=VALUE"
    kind = key_value("--set", number, sections, drop_section) if parse else str
    p.add_argument("--set", dest="overrides", type=kind, action="append", default=[], metavar=metavar,
                   help=f"{help} (repeatable)")


def section(pairs: list[tuple[str, object]], name: str) -> dict[str, object]:
    """The ``name.KEY=VALUE`` pairs of a sectioned ``--set`` as {KEY: value}."""
    return {k.partition(".")[2]: v for k, v in pairs if k.partition(".")[0] == name}


SEED = int_range(0, 2**32 - 1)  # numpy / the virtual rig take seeds in [0, 2**32)


# -- options declared once: a dataclass field carries its flag ---------------------------------------------
_CLI = "rigfm.cli"


def option(default: object = None, *, flag: str | tuple[str, ...] | None = None, help: str = "",
           group: str | None = None, required: bool = False, factory: Callable[[], object] | None = None,
           **argparse_kw: object) -> object:
    """A dataclass field that is also a command-line flag (declared once: name, default, help, check).

    ``flag`` defaults to ``--field-name`` (a tuple gives aliases, e.g. ``("-o", "--out")``); ``"rig"`` (no
    dashes) makes a positional argument; ``required=True`` makes a field without a default and a required
    flag. A bool field defaulting to False becomes ``store_true``; ``action="store_false"`` with its own
    ``flag`` (e.g. ``--quiet`` for ``status``) negates. ``group`` puts flags into one required mutually
    exclusive group. ``factory`` gives a mutable default (a list). Other keywords (``type``, ``choices``,
    ``metavar``, ``nargs``, ``const``, ``action``) go to ``add_argument``; with ``action="append"`` the flag
    defaults to None and an unused flag leaves the field's default."""
    meta = {_CLI: {"flag": flag, "help": help, "group": group, "kw": argparse_kw}}
    if required:
        return dataclasses.field(metadata=meta)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _field_default(f: dataclasses.Field) -> object:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _flags(f: dataclasses.Field, spec: dict) -> tuple[str, ...]:
    """An option field's flags (aliases first); the last is the one it is known by."""
    flags = spec["flag"] or "--" + f.name.replace("_", "-")
    return (flags,) if isinstance(flags, str) else tuple(flags)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a flag for every :func:`option` field of dataclass ``cls`` (its default is the flag's)."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_CLI)
        if spec is None:
            continue
        kw = dict(spec["kw"])
        flags = _flags(f, spec)
        flag = flags[-1]
        if flag.startswith("-"):
            kw["dest"] = f.name
            default = _field_default(f)
            if default is dataclasses.MISSING:
                kw["required"] = True
            else:
                kw["default"] = None if kw.get("action") == "append" else default
            if default is False and "action" not in kw:
                kw["action"] = "store_true"
            if "action" not in kw and "choices" not in kw:
                kw.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        target: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup = parser
        if spec["group"]:
            if spec["group"] not in groups:
                groups[spec["group"]] = parser.add_mutually_exclusive_group(required=True)
            target = groups[spec["group"]]
        target.add_argument(*flags, help=spec["help"] or None, **kw)


def option_values(cls: type, args: argparse.Namespace, changed_only: bool = False) -> dict[str, object]:
    """The parsed flags of ``cls``'s :func:`option` fields as {field: value}; an unused ``append`` flag is
    left out (the field keeps its default); ``changed_only``: only values that differ from the defaults."""
    out = {}
    for f in dataclasses.fields(cls):
        if _CLI not in f.metadata:
            continue
        value = getattr(args, f.name)
        if value is None and f.metadata[_CLI]["kw"].get("action") == "append":
            continue
        if changed_only and value == _field_default(f):
            continue
        out[f.name] = value
    return out


def options_from_args(cls: type, args: argparse.Namespace, **extra: object) -> object:
    """``cls`` built from the parsed flags of its :func:`option` fields, plus ``extra`` fields."""
    return cls(**option_values(cls, args), **extra)


def option_argv(obj: object) -> list[str]:
    """The flags that parse back into dataclass ``obj`` (its :func:`option` fields that differ from their
    defaults), to hand the same options on to a child process."""
    argv: list[str] = []
    for f in dataclasses.fields(obj):
        spec = f.metadata.get(_CLI)
        value = getattr(obj, f.name)
        if spec is None or value == _field_default(f):
            continue
        flag = _flags(f, spec)[-1]
        if isinstance(value, bool):
            argv.append(flag)  # a bool option is a switch: store_true, or store_false with its own flag
        elif flag.startswith("-"):
            argv += [flag, str(value)]
        else:
            argv.append(str(value))
    return argv


def call_with_args(fn: Callable[..., object], args: argparse.Namespace, **extra: object) -> object:
    """``fn(**kw)`` with every parsed flag named like one of ``fn``'s parameters, then ``extra`` (for the
    parameters whose flag has another name): a handler never copies its flags one by one."""
    kw = {name: getattr(args, name) for name in inspect.signature(fn).parameters if hasattr(args, name)}
    kw.update(extra)
    return fn(**kw)
