"""Settings as typed dataclasses whose defaults live in code, next to what they set.

YAML files only override (``python -m train configs/tiny.yaml``), and so does ``--set a.b=c`` on
the command line (values are parsed as YAML: ``--set optim.lr=1e-4``, ``--set data.train=[a,b]``).
A key that does not exist is an error that lists the valid ones; a value of the wrong type is an
error naming the expected type. Each trainer has its dataclasses (``train.autoencoder.config``,
``train.diffusion.config``); this is the machinery they share.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml


# ------------------------------------------------------------------------- the command line
def config_parser(module: str, description: str, configs: str, example: str, cls=None) -> argparse.ArgumentParser:
    """``python -m MODULE [CONFIG] [--set KEY=VALUE ...] [--help-config]``: the parser every
    trainer shares; ``cls``: the trainer's config dataclass, listed by ``--help-config``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("config", nargs="?", help=f"YAML file overriding the defaults ({configs})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one setting, e.g. {example}")
    if cls is not None:
        class HelpConfig(argparse.Action):
            def __call__(self, parser, namespace, values, option_string=None):
                print(describe_config(cls))
                parser.exit()

        parser.add_argument("--help-config", nargs=0, action=HelpConfig,
                            help="list every setting with its default and what it does, then exit")
    return parser


def describe_config(cls, prefix: str = "") -> str:
    """Every key of a config dataclass as ``key = default  # what it does`` (the comment beside or
    above the field in the source, where there is one), sections in order."""
    lines = []
    notes = field_notes(cls)
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            lines.append(describe_config(hint, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        note = notes.get(f.name)
        lines.append(f"{prefix}{f.name} = {yaml.safe_dump(default, default_flow_style=True).strip()}"
                     .removesuffix("\n...") + (f"  # {note}" if note else ""))
    return "\n".join(lines)


def field_notes(cls) -> dict[str, str]:
    """The comment of each field of a dataclass: on its line, else the comment lines right above."""
    import inspect
    import re

    notes, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"(\w+):[^#]*?(?:#\s*(.*))?$", stripped)
        if match and not stripped.startswith(("def ", "class ", "@")):
            notes[match[1]] = match[2] or " ".join(above) or None
        above = []
    return {k: v for k, v in notes.items() if v}


# ------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: list[str], cls):
    """Defaults <- YAML file <- ``a.b=c`` overrides, validated against the dataclasses of ``cls``
    (a trainer's top-level config dataclass)."""
    raw: dict = {}
    if path is not None:
        raw = yaml.safe_load(config_file(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        _assign(raw, key.strip().split("."), yaml.safe_load(value))
    return _build(cls, raw, "")


SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs/


def config_file(path: str | Path) -> Path:
    """``path`` itself, or where it is not a file, the shipped config of that name
    (``configs/tiny.yaml`` or ``tiny`` from any folder); a clear error listing them otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (SHIPPED_CONFIGS / path.name, SHIPPED_CONFIGS / f"{path.name}.yaml"):
        if not path.is_absolute() and candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))
    raise FileNotFoundError(f"{path}: no such config file" + (f" (shipped configs: {shipped})" if shipped else ""))


def _assign(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ValueError(f"cannot set {'.'.join(keys)}: {k} is not a section")
    tree[keys[-1]] = value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]} in {where}; "
            f"valid keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, prefix + name)
    return cls(**values)


def _coerce(value, hint, key: str):
    """Check ``value`` against a simple type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected {hint}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `--set data.train=path` means a one-item list
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, key) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, bool):
        return "yes" if value else "no"  # YAML 1.1 reads no/off/false as False: `mixed_precision: no`
    if hint is str and isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
