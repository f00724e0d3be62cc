"""Loading a config: one YAML file plus dotted ``key=value`` overrides, validated
against the schema, with errors that name the field and the fix."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sfedlora.settings.errors import ConfigError
from sfedlora.settings.schema import ExperimentConfig

# libyaml's parser where PyYAML was built with it (its wheels are): the same documents
# and the same types as the pure-Python SafeLoader, about ten times faster. A study's
# report reads the config of every run it holds (py-spy: 38 of 64 s went to parsing).
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, parsed by libyaml where it is available."""
    return yaml.load(text, Loader=_Loader)


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths += _field_paths(ann, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def format_validation_error(err: ValidationError) -> str:
    known = _field_paths(ExperimentConfig)
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int))
        # pydantic reports union members as extra path parts ('lora.alpha.float'): map
        # such a location onto its field, matching whole dotted parts only, so that a key
        # that merely extends a known one ('local.lrx') is reported as itself.
        if loc not in known:
            loc = next((k for k in known if loc.startswith(k + ".")), loc)
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; remove it"
            lines.append(f"unknown key {loc!r}{hint}")
        elif e["type"] == "value_error" or not loc:
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{loc}={e.get('input')!r}: {e['msg']}; fix {loc} in the config")
    return "invalid config: " + " | ".join(dict.fromkeys(lines))


def parse_value(text: str) -> Any:
    """Parse an override value the way YAML would ('8' -> 8, 'null' -> None, '[a,b]'),
    and numbers in exponent notation as numbers: YAML 1.1 reads '1e-3' as a string, so
    a sweep's ladder 1e-3,1e-2 would be sorted and grouped as text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a nested dict (in place, also returned)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node = child
        node[leaf] = parse_value(value)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (or the defaults: the offline main job) and apply overrides,
    checked against the schema only (:func:`sfedlora.config.load_config` also resolves
    it against its method and task)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
    apply_overrides(raw, list(overrides))
    return validate(raw)


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    """``raw`` checked against the schema (not yet against its method and task)."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
