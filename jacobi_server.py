#!/usr/bin/env python3
"""The local server for clients, `splitinfer serve`; its code is splitinfer/commands/serve.py."""

from splitinfer.commands.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
