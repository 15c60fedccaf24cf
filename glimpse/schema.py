"""Typed settings from YAML: mappings onto dataclasses, every key and type checked, and the
helpers that check choices and ranges with one-line errors naming the key.

Used by the recipe (glimpse.config) and by each family's validation of its `model:` section.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import torch

from glimpse.errors import GlimpseError

# dtype names a user may write (recipes, glimpse.load, glimpse convert) -> torch dtypes
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except GlimpseError:
                pass
        raise GlimpseError(f"recipe key {key}: expected {tp}, got {value!r}".replace("typing.", ""))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise GlimpseError(f"recipe key {key}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise GlimpseError(f"recipe key {key}: expected a mapping, got {value!r}")
        return {str(k): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise GlimpseError(f"recipe key {key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass `cls` from a mapping, refusing unknown keys.  A key in the class' `RETIRED`
    (name -> the default it had) is dropped at that default, so runs saved before its removal still
    load, and refused with any other value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GlimpseError(f"recipe section {prefix or '(top)'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    retired = getattr(cls, "RETIRED", {})
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k in retired and k not in names:
            if v == retired[k]:
                continue
            raise GlimpseError(f"recipe key {key} was removed (it is ignored only at its old default, "
                               f"{retired[k]!r}); drop it from the recipe")
        if k not in names:
            raise GlimpseError(f"unknown recipe key {key}; valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
        kwargs[k] = coerce(v, hints[k], key)
    return cls(**kwargs)


def torch_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from its name ("bf16", "float32", ...) or as it is; None stays None."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise GlimpseError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def check(ok: bool, key: str, value, what: str) -> None:
    """An error naming the recipe key unless `ok`: "recipe key KEY: VALUE WHAT"."""
    if not ok:
        raise GlimpseError(f"recipe key {key}: {value!r} {what}")


def choice(key: str, value, options: tuple) -> None:
    check(value in options, key, value, f"is not one of {', '.join(options)}")
