"""Reading a config: the params file, a profile over it, `-S section.key=value` overrides on top.

A params file holds one section per stage (params.yaml; DVC reads it for `params:` dependencies).
A profile is a partial overlay in its own file, `profiles/NAME.yaml` next to the params file (or
any `.yaml` path), so that DVC sees only the run's real parameters. Every key is checked against
the dataclasses of `tasn.config.schema` and every value against its field's rule, so a misspelt
key, a duplicated key, a value of the wrong type or out of bounds fails before any work starts,
with the file, line or key named.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from tasn.config.rules import check, coerce, field_types
from tasn.config.schema import Config
from tasn.errors import ConfigError, shown
from tasn.io import read_text

DEFAULT_PARAMS = "params.yaml"
PROFILES_DIR = "profiles"  # next to the params file
PARAMS_ENV = "TASN_PARAMS"  # the installed params file (the image's); its profiles/ sit beside it
PROFILES_ENV = "TASN_PROFILES"  # the profiles for params handed over as text (run-local: the caller's)
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


MAX_YAML_NODES = 10_000  # values a params file, profile or -S value may hold once its aliases are expanded


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last silently)
    and a key that is not a plain value (a list or a mapping cannot name a setting)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: a list or mapping used as a key
                raise ConfigError(f"{self.name}:{line}: a key must be a name, got {shown(key)}") from None
            if first is not None:
                raise ConfigError(f"{self.name}:{line}: duplicate key {shown(key)} (first at line {first})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, name: str, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values `node` holds with every alias expanded (each shared node counted once per
    use, computed once): a ConfigError past MAX_YAML_NODES, or for an alias to itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ConfigError(f"{name}:{node.start_mark.line + 1}: an alias refers to the value it is part of")
    open_.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    size = 1 + sum(_expanded_size(child, name, sizes, open_) for child in children)
    if size > MAX_YAML_NODES:
        raise ConfigError(f"{name}:{node.start_mark.line + 1}: expands to more than {MAX_YAML_NODES} values "
                          "through anchors and aliases (&name / *name); a config needs far fewer")
    open_.discard(key)
    sizes[key] = size
    return size


def parse_yaml(text: str, name: str) -> Any:
    """The value of the YAML document `text` (`name` says where it came from in errors), read
    safely: no tags that build objects, no duplicate or unhashable keys, at most MAX_YAML_NODES
    values once anchors and aliases are expanded (a few hundred bytes of aliases can otherwise
    expand to gigabytes), and a clear error for nesting too deep to parse."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, name, {}, set())
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: not valid YAML: {str(exc)[:1000]}") from None
    except RecursionError:
        raise ConfigError(f"{name}: values nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer past Python's 4300-digit limit
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{name}: {shown(str(exc))}") from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`; an empty file is an empty mapping. Clear errors for a missing
    file, a folder, text that is not UTF-8, invalid or oversized YAML, duplicate keys and anything
    that is not a mapping."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    data = parse_yaml(read_text(path, ConfigError), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def find_params(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The params file to read: `explicit` (which must exist), else params.yaml in the working
    directory if there is one, else the installed one ($TASN_PARAMS: the image's, whose profiles/
    `--profile NAME` then finds), else None (the defaults, which are what params.yaml holds)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"--params {path}: {'is a folder, not a YAML file' if path.is_dir() else 'no such file'}")
        return path
    for default in (Path(DEFAULT_PARAMS), Path(os.environ.get(PARAMS_ENV, DEFAULT_PARAMS))):
        if default.is_file():
            return default
    return None


def profile_path(profile: str, params: Path | None) -> Path:
    """`NAME` -> profiles/NAME.yaml beside the params file (the working directory without one);
    a path ending in .yaml / .yml is taken as it is."""
    if Path(profile).is_dir():
        raise ConfigError(f"--profile {shown(profile)} is a folder: give a profile's name (profiles/NAME.yaml "
                          f"beside the params file, e.g. {', '.join(available_profiles(params)) or 'smoke'}) "
                          "or the path of one .yaml file")
    if profile.endswith((".yaml", ".yml")):
        return Path(profile)
    if not _PROFILE_NAME.match(profile):
        raise ConfigError(f"profile {shown(profile)}: a profile is a name (profiles/NAME.yaml) or a path to a "
                          ".yaml file")
    return (params.parent if params is not None else Path()) / PROFILES_DIR / f"{profile}.yaml"


def available_profiles(params: Path | None) -> list[str]:
    folder = (params.parent if params is not None else Path()) / PROFILES_DIR
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def read_profile(profile: str, params: Path | None) -> dict[str, Any]:
    path = profile_path(profile, params)
    if not path.is_file():
        known = ", ".join(available_profiles(params)) or "none"
        raise ConfigError(f"profile {shown(profile)} is not in {path.parent} (profiles: {known})")
    return read_yaml(path)


def installed_params() -> Path:
    """The params file of this installation: $TASN_PARAMS (the image sets it), else params.yaml here."""
    return Path(os.environ.get(PARAMS_ENV, DEFAULT_PARAMS))


def write_params(text: str, folder: Path) -> Path:
    """Write params text handed over by a pipeline as `folder`/params.yaml, with a profiles folder
    beside it ($TASN_PROFILES, else the installed params' profiles/), so that `--profile NAME`
    finds the same profiles it finds next to the installed params file. Returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DEFAULT_PARAMS
    path.write_text(text)
    profiles = Path(os.environ.get(PROFILES_ENV) or installed_params().parent / PROFILES_DIR)
    if profiles.is_dir() and not (folder / PROFILES_DIR).exists():
        (folder / PROFILES_DIR).symlink_to(profiles.resolve(), target_is_directory=True)
    return path


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=0.05` -> (["train", "lr"], 0.05); the value is read as YAML (`parse_yaml`)."""
    if "=" not in text:
        raise ConfigError(f"override {shown(text)}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(p.strip() for p in path):
        raise ConfigError(f"override {shown(text)}: the key must name a section and a key, e.g. train.lr=0.05")
    return path, parse_yaml(raw, f"override {shown(text)}")


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_override(raw: dict[str, Any], text: str) -> None:
    keys, value = parse_override(text)
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {shown(text)}: {shown(k)} is not a section")
    node[keys[-1]] = value


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """A config dataclass from a mapping: unknown keys and wrong values are named."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {shown(data)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{str(unknown[0])[:100]}; known keys of {prefix.rstrip('.') or 'config'}: "
            + ", ".join(sorted(known))
        )
    hints = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        tp, name = hints[key], prefix + key
        nested = isinstance(tp, type) and dataclasses.is_dataclass(tp)
        kwargs[key] = build(tp, value, name + ".") if nested else coerce(value, tp, name)
    return cls(**kwargs)


def load_config(
    path: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Defaults <- the params file at `path` (None: no file) <- the profile <- the overrides,
    checked as a whole before it is returned."""
    params = Path(path) if path is not None else None
    raw = read_yaml(params) if params is not None else {}
    if "profiles" in raw:
        raise ConfigError(f"{params}: profiles do not live in the params file; "
                          f"put each in {PROFILES_DIR}/NAME.yaml next to it")
    if profile:
        raw = _merge(raw, read_profile(profile, params))
    for text in overrides:
        _apply_override(raw, text)
    cfg: Config = build(Config, raw)
    check(cfg)
    return cfg
