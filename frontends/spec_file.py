"""ModelSpec files: YAML or JSON documents holding ModelSpec fields, for architectures no checkpoint describes yet."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Union

import yaml
from pydantic import ValidationError

from ..files import write_text_atomic
from ..ir.errors import MlxcError
from .spec import ModelSpec

PathLike = Union[str, Path]


def validation_message(err: ValidationError, where: str, rename: Mapping[str, str] | None = None) -> str:
    """One readable message for a pydantic error: every bad field by dotted name, with what is wrong.

    `rename` maps spec field names back to the names the user wrote (e.g. Hugging Face keys).
    """
    rename = rename or {}
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        top = str(e["loc"][0]) if e["loc"] else ""
        if rename.get(top, top) != top:
            loc = f"{rename[top]}{loc[len(top):]} (spec field {loc})"
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:  # a whole-model check: speak of the fields by the user's names
            for old, new in rename.items():
                msg = re.sub(rf"\b{old}\b", new, msg)
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return f"{where}: invalid model spec:\n" + "\n".join(lines)


def check_finite(spec: ModelSpec, where: str) -> ModelSpec:
    """Refuse NaN and infinity anywhere in a spec: JSON and YAML read `NaN` / `.inf` as numbers, and a rope base or
    a norm epsilon that is not finite loads without complaint and then computes nothing but NaN."""
    def walk(value: Any, path: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise MlxcError(f"{where}: invalid model spec: {path} is {value}; it must be a finite number")
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")

    walk(spec.model_dump(), "")
    return spec


def spec_from_mapping(data: Any, where: str) -> ModelSpec:
    """Validate plain data as a ModelSpec, turning pydantic's error into an MlxcError that names `where`."""
    if not isinstance(data, Mapping):
        raise MlxcError(f"{where}: expected a mapping of ModelSpec fields, got {type(data).__name__}")
    try:
        return check_finite(ModelSpec.model_validate(dict(data)), where)
    except ValidationError as err:
        raise MlxcError(validation_message(err, where)) from None
    except (TypeError, ValueError, RecursionError) as err:  # a key that is not a string, nesting too deep, ...
        raise MlxcError(f"{where}: invalid model spec: {type(err).__name__}: {err}") from None


def load_spec_file(path: PathLike) -> ModelSpec:
    """Read a `.json`, `.yaml` or `.yml` spec; other suffixes are parsed as YAML, which also accepts JSON."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise MlxcError(f"cannot read spec file {p}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise MlxcError(f"{p}: not UTF-8 text") from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise MlxcError(f"{p}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except yaml.YAMLError as err:
        raise MlxcError(f"{p}: malformed YAML: {err}") from None
    except RecursionError:
        kind = "JSON" if p.suffix.lower() == ".json" else "YAML"
        raise MlxcError(f"{p}: malformed {kind} (nested too deep)") from None
    return spec_from_mapping(data, str(p))


def _spec_data(spec: ModelSpec) -> dict[str, Any]:
    """Non-default fields only, and `layers` dropped when it is what ModelSpec would derive anyway: short files."""
    data = spec.model_dump(mode="json", exclude_defaults=True)
    data = {"name": spec.name, "family": spec.family, **data}
    derived = ModelSpec.model_validate({**spec.model_dump(), "layers": ()}).layers
    if spec.layers == derived:
        data.pop("layers", None)
    return data


def dump_spec_file(spec: ModelSpec, path: PathLike) -> None:
    """Write `spec` as JSON (`.json`) or YAML (anything else) so that `load_spec_file` gives it back equal."""
    p = Path(path)
    data = _spec_data(spec)
    text = json.dumps(data, indent=2) + "\n" if p.suffix.lower() == ".json" else yaml.safe_dump(data, sort_keys=False)
    try:
        write_text_atomic(p, text)
    except OSError as err:
        raise MlxcError(f"cannot write spec file {p}: {err.strerror or err}") from None
