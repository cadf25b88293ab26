"""`python -m mathctl` runs the CLI."""

from mathctl.cli import main

raise SystemExit(main())
