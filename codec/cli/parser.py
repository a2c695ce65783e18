"""``vae-codec``: export, encode, decode, compress and evaluate codecs from the command line.

Every subcommand is a function of parsed arguments; ``main(argv)`` returns an exit code so the
CLI is tested in-process.
"""

from __future__ import annotations

import argparse
import sys

from codec.cli import coding, evaluation, generate, latents


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vae-codec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (coding, evaluation, latents, generate):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # for commands that start their own worker processes (eval --num-processes)
    try:
        return args.func(args)
    except Exception as exc:
        from codec.images import ImageLoadError  # late: the parser loads no torch (--help answers at once)

        if not isinstance(exc, (FileNotFoundError, FileExistsError, ValueError, ImageLoadError)):
            raise
        print(f"vae-codec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
