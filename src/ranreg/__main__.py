"""``python -m ranreg COMMAND ...``: the ``ranreg`` command, for environments whose
scripts folder is not on ``PATH`` (``python -m ranreg.cli`` is the same)."""

from ranreg.cli import main

raise SystemExit(main())
