"""``python -m sparseflash``: the ``sparseflash`` command."""

from sparseflash.cli import main

raise SystemExit(main())
