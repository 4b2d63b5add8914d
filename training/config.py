"""One config mechanism for every training entry point: a typed dataclass, YAML files, CLI overrides.

Precedence is CLI > file > defaults. Field docstrings (``metadata["help"]``) become ``--help``. Field names follow
``transformers.TrainingArguments`` where the concept is the same (output_dir, max_steps, learning_rate ...).
Lists and dicts are given on the command line as JSON (``--model_config '{"num_hidden_layers": 4}'``).
The resolved config is written into the run folder as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["parse_config", "load_yaml", "dump_yaml", "ConfigError", "config_to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message says which field and why."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def dump_yaml(data: dict[str, Any], path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, is_optional) of an annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(tp: Any, name: str):
    base, optional = _base_type(tp)
    origin = typing.get_origin(base) or base

    def convert(text: str) -> Any:
        if optional and text.strip().lower() in ("none", "null"):
            return None
        if origin in (list, dict):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                if origin is list:  # allow comma-separated lists of plain words
                    return [v for v in text.split(",") if v]
                raise argparse.ArgumentTypeError(f"--{name} expects JSON, got {text!r}") from None
            if not isinstance(value, origin):
                raise argparse.ArgumentTypeError(f"--{name} expects a JSON {origin.__name__}")
            return value
        if origin is bool:
            return _parse_bool(text)
        if origin is int:
            return int(float(text)) if "e" in text.lower() else int(text)
        if origin is float:
            return float(text)
        return text

    return convert


def _check_value(cls_name: str, field: dataclasses.Field, tp: Any, value: Any) -> Any:
    """Type-check a value from a YAML file (argparse already converts CLI strings)."""
    base, optional = _base_type(tp)
    origin = typing.get_origin(base) or base
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{cls_name}.{field.name} cannot be null")
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (int, float) and isinstance(value, str):  # YAML 1.1 reads 3e14 (no sign, no dot) as a string
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{cls_name}.{field.name} must be {origin.__name__}, got {value!r}") from None
        if origin is int and not number.is_integer():
            raise ConfigError(f"{cls_name}.{field.name} must be int, got {value!r}")
        return origin(number)
    if origin is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if origin in (int, float, str, bool, list, dict) and not (
        isinstance(value, origin) and not (origin is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{cls_name}.{field.name} must be {origin.__name__}, got {value!r}")
    return value


def parse_config(
    cls: type[T], argv: list[str] | None = None, prog: str | None = None, description: str | None = None
) -> T:
    """Build ``cls`` from ``--config FILE`` (YAML) and ``--field value`` overrides: CLI > file > defaults."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    parser = argparse.ArgumentParser(
        prog=prog, description=description or cls.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="YAML file with field: value pairs (CLI flags override it)")
    for f in fields:
        tp = hints[f.name]
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        parser.add_argument(
            f"--{f.name}",
            type=_converter(tp, f.name),
            default=argparse.SUPPRESS,
            metavar=_base_type(tp)[0].__name__.upper() if hasattr(_base_type(tp)[0], "__name__") else "VALUE",
            help=f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%"),
        )
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path:
        file_values = load_yaml(config_path)
        known = {f.name: f for f in fields}
        unknown = sorted(set(file_values) - set(known))
        if unknown:
            raise ConfigError(f"{config_path}: unknown field(s) {unknown}; see --help for the valid names")
        for key, value in file_values.items():
            values[key] = _check_value(cls.__name__, known[key], hints[key], value)
    values.update(args)  # CLI last: it wins
    try:
        cfg = cls(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    post = getattr(cfg, "validate", None)
    if callable(post):
        post()
    return cfg
