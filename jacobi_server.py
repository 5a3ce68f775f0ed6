#!/usr/bin/env python3
"""Local side of splitinfer: tokenizer, embedding, first and last layers, LM head, decoding.

Talks to cloud_server_kv.py over one persistent WebSocket (the spec's SSH tunnel:
--cloud http://localhost:5000 means the WebSocket is localhost:5001).  With
--prompt it generates once and prints the text.
"""

from __future__ import annotations

import argparse
import json
import sys

from splitinfer.cli import add_local_args, add_model_args, read_token, setup
from splitinfer.decoding.strategies import STRATEGIES
from splitinfer.local import LocalSide
from splitinfer.remote import CloudError, cloud_session, ws_url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_local_args(p, sorted(STRATEGIES))
    p.add_argument("--prompt", required=True, help="generate once for this prompt and exit")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    local = LocalSide(args.model, args.split_after, args.resume_at, args.device, args.dtype)
    try:
        with cloud_session(ws_url(args.cloud, args.cloud_ws), read_token(args.auth_token_file)) as span:
            g = local.generate(span, local.encode(args.prompt, args.raw), args.max_new_tokens, args.mode)
    except CloudError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(g.as_dict()) if args.json else g.text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
