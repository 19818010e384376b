"""``python -m ranreg.cli COMMAND ...`` (what ``torchrun -m ranreg.cli train`` runs)."""

from ranreg.cli import main

raise SystemExit(main())
