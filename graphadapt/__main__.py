"""``python -m graphadapt``: the ``graphadapt`` command (:func:`graphadapt.cli.main`), e.g. where the
console script is not on ``PATH``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
