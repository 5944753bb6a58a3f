"""``python -m siss.stable_diffusion``: the installed command ``siss-stable-diffusion``, also
where the package is not installed with its scripts (``accelerate launch -m``, ``torchrun -m``)."""

import sys

from siss.stable_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main())
