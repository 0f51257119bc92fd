"""``python -m mp_eplb`` runs the command-line interface."""

from mp_eplb.cli import main

raise SystemExit(main())
