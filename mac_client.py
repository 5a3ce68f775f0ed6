#!/usr/bin/env python3
"""The light client of the local server, `splitinfer client`; its code is splitinfer/commands/client.py.

Run from a copy of the repository it needs only Python 3.10+ and requests (no install, no torch).
"""

from splitinfer.commands.client import main

if __name__ == "__main__":
    raise SystemExit(main())
