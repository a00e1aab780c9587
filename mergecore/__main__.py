"""``python -m mergecore ...`` is the ``mergecore`` command."""

from mergecore.cli import main

raise SystemExit(main())
