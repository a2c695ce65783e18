"""``vae-codec``: the command line. :mod:`codec.cli.parser` builds it from one module per command
group (:mod:`~codec.cli.coding`, :mod:`~codec.cli.latents`, :mod:`~codec.cli.evaluation`,
:mod:`~codec.cli.generate`), which share only :mod:`~codec.cli.options`."""

from codec.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
