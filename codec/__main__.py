"""``python -m codec ARGS``: the ``vae-codec`` command, for launchers that take a module
(``torchrun --nproc_per_node 8 -m codec eval ...``, ``accelerate launch -m codec eval ...``)."""

import sys

from codec.cli.parser import main

if __name__ == "__main__":
    sys.exit(main())
