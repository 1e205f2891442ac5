"""The one typed parser of `key=value` settings, used by YAML recipes, `lmforge pretrain` overrides
and fine-tuning options (`lmforge finetune ... lr=3e-5 lora=true max_minutes=none`).

A value is turned into the type the dataclass field declares (`coerce`): "3e-4" → 3e-4 for a
float, "true"/"yes"/"1" → True for a bool, "none"/"null" → None where None is allowed, one of
the choices of a Literal. On the command line a value stays the text as typed unless it is a
YAML flow list or mapping (`data.source=[a.txt, b.txt]`), so `text_field=yes` is the string
"yes", not a boolean. Errors name the key, the value and what was expected.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def coerce(value, tp, where: str):
    """`value` (from YAML or the command line) as type `tp`; a ValueError naming `where` if it
    cannot be (PyYAML reads 3e-4 as a string, so strings are parsed by the declared type)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or type(tp).__name__ == "UnionType":
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ValueError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}={value!r}: expected one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}={value!r}: expected a list")
        return [coerce(v, args[0], where) for v in value] if args else value
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{where}={value!r}: expected true or false")
    if tp in (int, float):
        return _number(value, tp, where)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"{where}={value!r}: expected a string")
        return str(value)
    return value


def _number(value, tp, where: str):
    if isinstance(value, bool):
        raise ValueError(f"{where}={value!r}: expected a number")
    try:
        number = float(value) if isinstance(value, str) else value
        if not isinstance(number, (int, float)):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r}: expected {tp.__name__}") from None
    if tp is int:
        if not float(number).is_integer():
            raise ValueError(f"{where}={value!r}: expected an integer")
        return int(number)
    return float(number)


def coerce_fields(cls, values: dict, where: str, section: str | None = None) -> dict:
    """`values` coerced to the field types of dataclass `cls`; an unknown key is an error that
    lists the known ones."""
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    out = {}
    for key, value in values.items():
        name = f"{section}.{key}" if section else key
        if key not in known:
            owner = section or cls.__name__
            raise ValueError(f"{where}: unknown key '{name}'; {owner} takes: {', '.join(known)}")
        out[key] = coerce(value, hints[key], f"{where}: {name}" if where else name)
    return out


def parse_value(raw: str):
    """A command-line value: the text as typed, except a YAML flow list or mapping ("[a, b]")."""
    text = raw.strip()
    if text[:1] in ("[", "{"):
        import yaml
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return raw
    return raw


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key=value` strings → {key: value} (values by `parse_value`, keys as given, dashes as
    underscores); a string without '=' is an error."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key or not all(key.split(".")):
            raise ValueError(f"override {item!r}: empty key")
        out[key] = parse_value(raw)
    return out


# sections a YAML recipe may give as a bare string, and the key that string stands for
_SHORTHAND = {"model": "preset", "objective": "name"}


def apply_overrides(d: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of the nested dict `d` with dotted keys set from `key=value` strings."""
    d = copy.deepcopy(d)
    for item in overrides:
        (key, value), = parse_overrides([item]).items()
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            if p in _SHORTHAND and isinstance(node.get(p), str):
                node[p] = {_SHORTHAND[p]: node[p]}
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return d
