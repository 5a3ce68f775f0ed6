"""The cloud side: middle layers, per-session KV caches, a WebSocket endpoint and a health page.

Nothing here imports a tokenizer or sees a token id: the cloud only ever holds
hidden states, rotary tables, masks and its own caches.
"""
