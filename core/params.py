"""Typed step parameters: one dataclass per step, filled from `--set key=value` or a recipe table.

Values from the command line arrive as strings and are converted by the field's annotation
(``int``, ``float``, ``bool``, ``str``, ``list[str]``, ``list[int]``, ``X | None``). Unknown keys and
bad values raise :class:`UserError` naming the key, the step and the valid choices, before any
model is loaded. Validation specific to a step lives in its dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from winnow.core.store import UserError

T = TypeVar("T")

INT_LIMIT = 2**63
KEY_RANGES = {"seed": (0, 2**32 - 1), "threads": (0, 1024)}  # every step's seeders and thread pools
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _convert(value, non_none[0], key, where)
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: {key}={value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        inner = args[0] if args else str
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return [_convert(v, inner, key, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a table, got {value!r}")
        return value
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            if not -INT_LIMIT < int(value) < INT_LIMIT:  # a 20-digit seed overflowed torch's int64
                raise UserError(f"{where}: {key}={value} is out of range (|value| < 2^63)")
            lo, hi = KEY_RANGES.get(key.rsplit(".", 1)[-1], (-INT_LIMIT, INT_LIMIT))
            if not lo <= int(value) <= hi:  # seed=-1 and threads=100000 gave tracebacks in every step
                raise UserError(f"{where}: {key}={value} is outside [{lo}, {hi}]")
            return int(value)
        if tp is float:
            if not math.isfinite(float(value)):  # lr=inf trained to NaN and saved it (issue 24)
                raise UserError(f"{where}: {key}={value} is not a finite number")
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {key}={value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def field_types(cls: type) -> dict[str, Any]:
    """The settable fields (``metadata={"internal": True}`` marks one the program fills, never a user)."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")
    }


def _resolve_aliases(values: dict[str, Any], cls: type, types_: dict[str, Any], where: str) -> dict[str, Any]:
    """Old names -> current ones by ``cls.ALIASES`` (``{"lora_r": "lora.r", "q_tuning": "online.q_tuning"}``):
    a key, or the first part of a dotted key, that is no field of ``cls`` is renamed; so is a group's own
    name given a plain value (``online=q_tuning`` -> ``online.policy=q_tuning``)."""
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    out: dict[str, Any] = {}
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        new = key
        if head in aliases and head not in types_:
            new = aliases[head] + dot + rest
        elif (
            not dot
            and key in aliases
            and dataclasses.is_dataclass(types_.get(key))
            and not isinstance(value, dict)
        ):
            new = aliases[key]
        if new in out:
            raise UserError(f"{where}: {key} and {new} name the same parameter; give one")
        out[new] = value
    return out


def _group_namespaces(values: dict[str, Any], types_: dict[str, Any]) -> dict[str, Any]:
    """``{"q_tuning.r_sample": "0.5"}`` -> ``{"q_tuning": {"r_sample": "0.5"}}`` for dataclass fields."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        if dot and dataclasses.is_dataclass(types_.get(head)):
            sub = out.setdefault(head, {})
            if not isinstance(sub, dict):
                raise UserError(f"{head} is given both as a whole and as {key}")
            sub[rest] = value
        else:
            out[key] = value
    return out


def build_params(cls: type[T], values: dict[str, Any], where: str, *, _prefix: str = "") -> T:
    """Instantiate ``cls`` from a mapping, converting and validating every value.

    A field whose type is itself a parameter dataclass is a namespace: ``--set ns.key=value`` (or a
    recipe sub-table ``[ns]``) fills it, e.g. ``online.q_tuning.r_sample=0.25``; ``cls.ALIASES`` maps
    names a parameter had before to its current key (:func:`_resolve_aliases`).
    """
    types_ = field_types(cls)
    values = _group_namespaces(_resolve_aliases(values, cls, types_, where), types_)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise UserError(
            f"{where}: unknown parameter(s) {unknown}; valid: {sorted(types_)}"
            + suggest([_prefix + k for k in unknown], _suggestion_keys(cls, _prefix))
        )
    converted = {}
    for k, v in values.items():
        if dataclasses.is_dataclass(types_[k]):
            if not isinstance(v, dict):
                raise UserError(f"{where}: {k} is a group of parameters: use {k}.KEY=VALUE")
            converted[k] = build_params(types_[k], v, f"{where} {k}", _prefix=f"{_prefix}{k}.")
        else:
            converted[k] = _convert(v, types_[k], k, where)
    try:
        return cls(**converted)
    except TypeError as e:  # a required field is missing
        raise UserError(f"{where}: {e}") from None
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def flat_defaults(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """``[("online.q_tuning.r_sample", 0.25), ...]``: every settable key of ``cls`` and its default, groups
    flattened to the dotted keys ``--set`` takes (what ``winnow steps`` lists)."""
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("internal"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            out += flat_defaults(type(default), f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, default))
    return out


def _suggestion_keys(cls: type, prefix: str) -> dict[str, str]:
    """What an unknown key may have meant: every dotted key of ``cls`` (and, at the top, its aliases),
    each mapped to the key it names now."""
    keys = {prefix + k: prefix + k for k, _ in flat_defaults(cls)}
    if not prefix:
        for old, new in getattr(cls, "ALIASES", {}).items():
            keys.setdefault(old, new)
    return keys


def suggest(unknown: list[str], keys: dict[str, str]) -> str:
    """``"; did you mean `lora.r`?"`` for the keys closest to an unknown one (difflib, at most 3), or "".

    ``keys`` maps each candidate spelling (a current key or an alias) to the current key, so
    ``lora_rank`` is matched against ``lora_r`` too but suggested as ``lora.r``."""
    import difflib

    found: list[str] = []
    for key in unknown:
        for near in difflib.get_close_matches(key, list(keys), n=3, cutoff=0.6):
            if keys[near] not in found:
                found.append(keys[near])
    return "; did you mean " + " or ".join(f"`{k}`" for k in found[:3]) + "?" if found else ""


def field_docs(cls: type) -> dict[str, str]:
    """One line per field of the dataclass ``cls``: ``metadata={"help": ...}``, else the field's trailing
    ``# comment`` (the convention of every parameter dataclass), else the comment lines right above it.
    Inherited fields keep their own class's text; ``{}`` where the source is not available."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    docs: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = src.splitlines()
        comments = {
            t.start[0]: t.string.lstrip("#").strip()
            for t in tokenize.generate_tokens(io.StringIO(src).readline)
            if t.type == tokenize.COMMENT
        }
        body = ast.parse(src).body[0]
        for node in getattr(body, "body", []):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            own = [
                comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments
            ]
            above, n = [], node.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, comments.get(n, ""))
                n -= 1
            docs[node.target.id] = " ".join(own or above)
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs[f.name] = f.metadata["help"]
    return docs


def flat_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """:func:`field_docs` under the dotted keys of :func:`flat_defaults` (a group's fields from its class)."""
    docs = field_docs(cls)
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("internal"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            out.update(flat_docs(type(default), f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = docs.get(f.name, "")
    return out


def parse_sets(sets: list[str] | None, where: str) -> dict[str, str]:
    """``["a=1", "b=x,y"]`` -> ``{"a": "1", "b": "x,y"}``."""
    out: dict[str, str] = {}
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"{where}: --set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def as_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)
