"""``python -m faasmoe.router`` is ``faasmoe-router``."""

import sys

from faasmoe.router.cli.main import main

sys.exit(main())
