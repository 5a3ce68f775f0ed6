"""`python -m splitinfer.wan ...`: the same as `python -m splitinfer wan ...`."""

from .cli import main

raise SystemExit(main())
