"""Privacy of the split: what crosses the wire (wiretap), and how much of it can be inverted (the rest).

    wiretap     recording TCP proxy, WebSocket frame parser, byte searches, process inspection
    public      the attacker's public model and the victim's real local head, defences
    attackers   MLP classifier, nearest neighbour, ridge + NN, white-box exact matching, output reader
    texts       held-out texts (prose, chat with synthetic personal data, random ids) and training corpus
    metrics     per-sequence scores and bootstrap confidence intervals
    experiment  the whole sweep behind inversion_experiment.py
    report      Markdown tables and the figure, rendered from the JSON
"""
