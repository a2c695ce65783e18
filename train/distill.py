"""``python -m train.distill CONFIG [--set a.b=c ...]``: distil an ``AutoencoderTiny`` student from
an ``AutoencoderKL`` teacher (the recipe: :mod:`train.autoencoder.recipes.student`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """``python -m train`` with ``model.kind`` set to ``autoencoder-tiny`` (after the config file
    and the other ``--set`` options, so a distillation config cannot train something else)."""
    from train.__main__ import main as train_main

    return train_main(argv, module="train.distill", forced=("model.kind=autoencoder-tiny",),
                      description="Distil an AutoencoderTiny (TAESD-style) preview codec from an AutoencoderKL "
                                  "teacher.",
                      example="--set distill.teacher=runs/t1/codec")


if __name__ == "__main__":
    sys.exit(main())
