#!/usr/bin/env python3
"""The cloud side, `splitinfer cloud`; its code is splitinfer/commands/cloud.py."""

from splitinfer.commands.cloud import main

if __name__ == "__main__":
    raise SystemExit(main())
