"""``python -m codec.compress ARGS`` (and ``accelerate launch -m codec.compress ARGS``): the same
as ``vae-codec compress ARGS``. Kept at this path because users' launch scripts name it; the
code is :mod:`codec.latents` and :mod:`codec.cli.latents`."""

import sys

from codec.cli.latents import main

if __name__ == "__main__":
    sys.exit(main())
