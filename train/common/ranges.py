"""The valid range of every numeric setting, checked when a config loads.

A value out of range fails at once, naming the key, the value and the range, instead of crashing
at step 1 (``log_every: 0``), at the first checkpoint (``scale_samples: 0``) or never, training
something else than asked (``ema_decay: 1.5``, ``loss.kl_weight: -1``). ``image_every`` and
``val_every`` 0 mean off. Ranges are written as intervals: ``[0, 1)`` includes 0 and excludes 1;
``inf`` is unbounded. A list is checked item by item; ``None`` (an optional value left unset) is
not checked. ``tests/test_config.py`` checks that every numeric key of both trainers has a range.
"""

from __future__ import annotations

import dataclasses
import math
import typing

POSITIVE, NON_NEGATIVE, AT_LEAST_ONE, SHARE = "(0, inf)", "[0, inf)", "[1, inf)", "[0, 1)"

def within(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval`` ("[0, 1)", "(0, inf)"); NaN lies in none."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value > low or (interval[0] == "[" and value == low)
    below = value < high or (interval[-1] == "]" and value == high)
    return above and below and not math.isnan(value)


def _value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_ranges(cfg, ranges: dict[str, str]) -> None:
    """Raise ValueError for the first key of ``ranges`` whose value in ``cfg`` is out of range."""
    for key, interval in ranges.items():
        value = _value(cfg, key)
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if not within(item, interval):
                raise ValueError(f"{key}: {value!r} is out of range; valid values are in {interval}")


def numeric_keys(cls, prefix: str = "") -> list[str]:
    """Every int/float setting of a config dataclass (lists and optionals of them too)."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += numeric_keys(hint, f"{prefix}{name}.")
            continue
        args = set(typing.get_args(hint)) | {hint}
        if args & {int, float, list[int], list[float]}:
            keys.append(prefix + name)
    return keys
