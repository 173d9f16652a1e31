"""``python -m pyro_vae`` (and ``torchrun -m pyro_vae``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
