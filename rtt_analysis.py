#!/usr/bin/env python3
"""The RTT decomposition experiment; its code is splitinfer/commands/rtt_analysis.py."""

from splitinfer.commands.rtt_analysis import main

if __name__ == "__main__":
    raise SystemExit(main())
