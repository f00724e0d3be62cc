"""Experiment configuration: one YAML file plus dotted ``key=value`` overrides, checked
against the schema and resolved against its method and task.

Everything is validated before any model or data is touched. Errors are raised as
:class:`ConfigError` with one message that names the field and says how to fix it,
because a researcher launching a sweep should learn about a typo in one second, not
after a model has loaded.

:mod:`sfedlora.settings` holds the schema and its reading, below every layer that
reads a config. This module sits above the methods and tasks: :func:`resolve` checks
that the method and task exist, validates the method's ``options`` with its own model,
attaches the defaults a config falls back on (the method's scale, server optimizer,
A initialisation and codec presets; the task's base model) and applies the method's
and task's refusals. :func:`load_config` and :func:`validate` return resolved configs.

Layer 7. May import: every layer below (``core`` to ``methods``/``tasks``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

import sfedlora.settings as settings
from sfedlora.methods import REGISTRY, get_method, method_class
from sfedlora.settings import ConfigError, Defaults, ExperimentConfig
from sfedlora.settings import load_config as read_config
from sfedlora.settings import validate as check_schema
from sfedlora.settings.schema import LEGACY_OPTIONS
from sfedlora.tasks import TASKS, get_task


def resolve(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its method's and task's defaults attached, after their checks
    (:class:`ConfigError` naming the setting and the fix)."""
    if cfg.task not in TASKS:
        raise ConfigError(f"invalid config: task={cfg.task!r} is not a task; choose one of "
                          f"{sorted(TASKS)}")
    try:
        method_class(cfg.method)
    except ValueError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    cfg = _adopt_legacy_sections(cfg)
    method, task = _method_with_options(cfg), get_task(cfg.task)
    resolved = cfg.with_defaults(Defaults(
        scaling=method.traits.scaling, server_optimizer=method.traits.server_optimizer,
        a_init=method.traits.a_init_modes[0], comm=dict(method.traits.comm),
        model_name=task.default_model))
    try:
        resolved.check_with(method, task, [n for n, m in REGISTRY.items() if m.traits.vera])
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid config: {exc}") from None
    return resolved


def _adopt_legacy_sections(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the settings of its pre-options sections (``soft.keep``,
    ``tsfa.v``, ``personal.grid``, ...) moved into ``options`` where the method's
    Options model takes them (an ``options`` value wins); the rest never applied to
    this method and is dropped."""
    legacy = cfg.options.get(LEGACY_OPTIONS)
    if legacy is None:
        return cfg
    fields = method_class(cfg.method).Options.model_fields
    options = {k: v for k, v in cfg.options.items() if k != LEGACY_OPTIONS}
    for section in legacy.values():
        for key, value in (section or {}).items():
            if key in fields:
                options.setdefault(key, value)
    return cfg.model_copy(update={"options": options})


def _method_with_options(cfg: ExperimentConfig):
    """The method with ``options`` validated by its own model: an error names the
    setting and what the method accepts."""
    try:
        return get_method(cfg.method, cfg.options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fields = sorted(method_class(cfg.method).Options.model_fields) or ["none"]
        raise ConfigError(
            f"invalid config: options.{where}: {first['msg']} (method={cfg.method} takes "
            f"options {', '.join(fields)})") from None


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    """``raw`` (a nested dict) as a resolved config."""
    return resolve(check_schema(raw))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (or the defaults: the offline main job), apply overrides,
    and resolve it."""
    return resolve(read_config(path, overrides))


def __getattr__(name: str):
    """The settings' other names (``DataConfig``, ``to_yaml``, ...), importable from
    here too: ``sfedlora.config`` is where users and the upper layers reach configs."""
    if name in settings.__all__:
        return getattr(settings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*(n for n in settings.__all__ if n not in ("load_config", "validate")),
           "load_config", "resolve", "validate"]
