"""Typed configuration: one source of truth for every stage.

- `schema`: the sections (one dataclass per stage), each field with its type, its rule and its
  default. The defaults are the embedded CPU demo, i.e. exactly what params.yaml holds (a test
  keeps them equal) and what a user gets with no params file at all.
- `rules`: how a field states its rule (`Literal[...]` choices from `tasn.choices`,
  `Annotated[..., Range(...)]` bounds, finite floats) and `check`, which enforces them.
- `loader`: params file <- profile (profiles/NAME.yaml: `cub`, `cub336`, `smoke`, `demo` = no
  overlay) <- `-S section.key=value` overrides, every key and value checked before any work starts.
"""

from tasn.config.loader import (
    DEFAULT_PARAMS,
    PARAMS_ENV,
    PROFILES_DIR,
    PROFILES_ENV,
    find_params,
    installed_params,
    load_config,
    parse_override,
    profile_path,
    read_yaml,
    write_params,
)
from tasn.config.rules import Range, check
from tasn.config.schema import (
    Config,
    DataConfig,
    DetailsConfig,
    EvaluateConfig,
    FashionConfig,
    LossConfig,
    ModelConfig,
    PreprocessConfig,
    RegisterConfig,
    SynthConfig,
    TrackingConfig,
    TrainConfig,
    ValidateConfig,
)
from tasn.errors import ConfigError

__all__ = [
    "DEFAULT_PARAMS",
    "PARAMS_ENV",
    "PROFILES_DIR",
    "PROFILES_ENV",
    "Config",
    "ConfigError",
    "DataConfig",
    "DetailsConfig",
    "EvaluateConfig",
    "FashionConfig",
    "LossConfig",
    "ModelConfig",
    "PreprocessConfig",
    "Range",
    "RegisterConfig",
    "SynthConfig",
    "TrackingConfig",
    "TrainConfig",
    "ValidateConfig",
    "check",
    "find_params",
    "installed_params",
    "load_config",
    "parse_override",
    "profile_path",
    "read_yaml",
    "write_params",
]
