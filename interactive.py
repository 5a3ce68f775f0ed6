#!/usr/bin/env python3
"""Chat with the split model, `splitinfer chat`; its code is splitinfer/commands/chat.py."""

from splitinfer.commands.chat import main

if __name__ == "__main__":
    raise SystemExit(main())
