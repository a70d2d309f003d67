"""``python -m dinov2.train``: see ``dinov2.run.cli``."""

import sys

from dinov2.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
