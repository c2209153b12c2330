"""``python -m edgeway`` is the same as the ``edgeway`` command."""

from edgeway.cli import main

raise SystemExit(main())
