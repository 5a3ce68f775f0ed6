#!/usr/bin/env python3
"""The lookahead ablation experiment; its code is splitinfer/commands/lookahead_ablation.py."""

from splitinfer.commands.lookahead_ablation import main

if __name__ == "__main__":
    raise SystemExit(main())
