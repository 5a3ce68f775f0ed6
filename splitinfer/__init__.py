"""splitinfer: LLM inference split between a trusted local machine and an untrusted cloud over a WAN."""
