"""Privacy of the split: what crosses the wire (wiretap), and how much of it can be inverted (the rest).

    wiretap     a tap on the WAN proxy, WebSocket frame parser, byte searches, process inspection
    public      the attacker's public knowledge: the published model, a forkable prefix cache, tolerances
    victim      the real local side: its split, loading, the states it sends, a span that records them
    defences    noise on the sent states, perturbed local layers, LoRA-fine-tuned local layers
    attackers   MLP classifier, nearest neighbour, ridge + NN, white-box exact matching, output reader
    texts       held-out texts (prose, chat with synthetic personal data, random ids) and training corpus
    metrics     per-sequence scores and bootstrap confidence intervals
    settings    what the sweep runs (torch-free, for the CLI's --help)
    experiment  the whole sweep behind inversion_experiment.py, phase by phase
    report      Markdown tables and the figure, rendered from the JSON
"""
