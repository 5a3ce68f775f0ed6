#!/usr/bin/env python3
"""The output identity experiment; its code is splitinfer/commands/perplexity_comparison.py."""

from splitinfer.commands.perplexity_comparison import main

if __name__ == "__main__":
    raise SystemExit(main())
