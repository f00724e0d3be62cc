"""Layer 1, settings: what a config holds (:mod:`.schema`) and how it is read
(:mod:`.loading`); :mod:`sfedlora.config` resolves a config against its method and task
(their defaults and refusals).

May import: ``core``.

Experiment configuration: one YAML file plus dotted ``key=value`` overrides.

Everything is validated before any model or data is touched. Errors are raised as
:class:`ConfigError` with one message that names the field and says how to fix it,
because a researcher launching a sweep should learn about a typo in one second, not
after a model has loaded. :mod:`.schema` is what a config holds, :mod:`.loading` how
it is read.
"""

from sfedlora.settings.errors import ConfigError
from sfedlora.settings.loading import (
    apply_overrides,
    load_config,
    parse_value,
    to_yaml,
    validate,
)
from sfedlora.settings.schema import (
    CheckpointConfig,
    ClientsConfig,
    CodecConfig,
    CommConfig,
    DataConfig,
    Defaults,
    EvalConfig,
    ExperimentConfig,
    FlowerConfig,
    LocalConfig,
    LoraConfig,
    ModelConfig,
    NetworkConfig,
    PrivacyConfig,
    ServerConfig,
)

__all__ = [
    "CheckpointConfig", "ClientsConfig", "CodecConfig", "CommConfig", "ConfigError",
    "DataConfig", "Defaults", "EvalConfig", "ExperimentConfig", "FlowerConfig", "LocalConfig",
    "LoraConfig", "ModelConfig", "NetworkConfig", "PrivacyConfig", "ServerConfig",
    "apply_overrides", "load_config", "parse_value", "to_yaml", "validate",
]
