#!/usr/bin/env python3
"""The privacy (inversion) experiment; its code is splitinfer/commands/inversion_experiment.py."""

from splitinfer.commands.inversion_experiment import main

if __name__ == "__main__":
    raise SystemExit(main())
