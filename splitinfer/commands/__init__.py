"""The command-line entry points (`python -m splitinfer COMMAND`, the top-level scripts, console scripts).

Each module builds its parser without importing torch or transformers, so `--help` answers at once;
the heavy imports happen inside `main`, after the arguments are parsed.
"""
