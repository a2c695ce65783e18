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

TRAIN_RANGES = {
    "mlp.image_size": AT_LEAST_ONE, "mlp.in_channels": "[1, 3]", "mlp.hidden_sizes": AT_LEAST_ONE,
    "mlp.latent_size": AT_LEAST_ONE, "mlp.num_classes": AT_LEAST_ONE, "mlp.beta": NON_NEGATIVE,
    "mlp.kl_anneal_steps": AT_LEAST_ONE, "mlp.kl_anneal_cycles": AT_LEAST_ONE, "mlp.kl_anneal_ratio": "(0, 1]",
    "mlp.free_bits": NON_NEGATIVE,
    "distill.latent_weight": NON_NEGATIVE,
    "data.crop_size": "[8, inf)", "data.crop_min_fraction": "(0, 1]", "data.num_workers": NON_NEGATIVE,
    "data.val_images": AT_LEAST_ONE, "data.val_crop": NON_NEGATIVE,
    "loss.perceptual_weight": NON_NEGATIVE, "loss.perceptual_start": NON_NEGATIVE,
    "loss.kl_weight": NON_NEGATIVE, "loss.logvar_init": "(-inf, inf)", "loss.disc_weight": NON_NEGATIVE,
    "loss.disc_start": NON_NEGATIVE, "loss.disc_factor": NON_NEGATIVE, "loss.disc_layers": AT_LEAST_ONE,
    "loss.disc_channels": AT_LEAST_ONE, "loss.equivariance_weight": NON_NEGATIVE,
    "optim.lr": POSITIVE, "optim.disc_lr": POSITIVE, "optim.betas": SHARE, "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_steps": NON_NEGATIVE, "optim.min_lr_ratio": "[0, 1]", "optim.max_grad_norm": NON_NEGATIVE,
    "seed": NON_NEGATIVE, "batch_size": AT_LEAST_ONE, "grad_accum": AT_LEAST_ONE, "max_steps": AT_LEAST_ONE,
    "max_minutes": NON_NEGATIVE, "ema_decay": SHARE, "checkpoint_every": AT_LEAST_ONE,
    "keep_checkpoints": AT_LEAST_ONE, "log_every": AT_LEAST_ONE, "image_every": NON_NEGATIVE,
    "val_every": NON_NEGATIVE, "scale_samples": AT_LEAST_ONE, "max_nonfinite_steps": AT_LEAST_ONE,
}

LDM_RANGES = {
    "model.block_out_channels": AT_LEAST_ONE, "model.layers_per_block": AT_LEAST_ONE,
    "model.attention_levels": NON_NEGATIVE, "model.norm_num_groups": AT_LEAST_ONE,
    "data.num_workers": NON_NEGATIVE,
    "seed": NON_NEGATIVE, "batch_size": AT_LEAST_ONE, "max_steps": AT_LEAST_ONE, "lr": POSITIVE,
    "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
    "ema_decay": SHARE, "num_train_timesteps": AT_LEAST_ONE, "sample_steps": AT_LEAST_ONE,
    "num_samples": AT_LEAST_ONE, "sample_every": NON_NEGATIVE, "checkpoint_every": AT_LEAST_ONE,
    "keep_checkpoints": AT_LEAST_ONE, "log_every": AT_LEAST_ONE, "class_dropout": SHARE,
    "guidance_scale": NON_NEGATIVE, "max_minutes": NON_NEGATIVE, "max_nonfinite_steps": AT_LEAST_ONE,
}


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
