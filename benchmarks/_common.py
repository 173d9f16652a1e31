"""What the benchmark scripts share: where MNIST is found, and one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pyro_vae import PyroVAEError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def default_data_dir() -> str | None:
    """$PYRO_VAE_DATA, else the project's shared data folder beside the checkout (where CI
    and the tests find MNIST), else None: pyro-vae's own cache folder."""
    if os.environ.get("PYRO_VAE_DATA"):
        return os.environ["PYRO_VAE_DATA"]
    return str(SHARED_DATA) if (SHARED_DATA / "MNIST" / "raw").is_dir() else None


def run_main(main: Callable[[], None]) -> None:
    """``main()``, with pyro-vae's progress logged and its errors (e.g. no MNIST) as one
    line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main()
    except PyroVAEError as e:
        print(f"{Path(sys.argv[0]).name}: {e}", file=sys.stderr)
        sys.exit(2)
