"""``python -m faasmoe.node``: same as the ``faasmoe-node`` console script."""

from faasmoe.node.cli import main

raise SystemExit(main())
