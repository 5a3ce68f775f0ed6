"""Tables (Markdown) and the figure, rendered from experiment_data/inversion.json only.

    python -m splitinfer.privacy.report experiment_data/inversion.json   # prints the tables for docs/privacy.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ATTACKER_NAMES = {
    "mlp": "MLP classifier (spec's attacker)",
    "nn": "nearest neighbour (token-alone states)",
    "ridge": "ridge map + nearest embedding",
    "whitebox": "white-box exact matching (public weights)",
    "output": "output: public tail + LM head",
}
KIND_ORDER = ("prose", "chat", "random", "all")
INPUT_ORDER = ("mlp", "nn", "ridge", "whitebox")


def _pct(metric: dict | None, ci: bool = True) -> str:
    if not metric:
        return "–"
    m = 100 * metric["mean"]
    if not ci:
        return f"{m:.1f}"
    lo, hi = (100 * x for x in metric["ci95"])
    return f"{m:.1f} [{lo:.0f}–{hi:.0f}]"


def _find(summary: list[dict], **key) -> dict | None:
    for row in summary:
        if all(row.get(k) == v for k, v in key.items()):
            return row
    return None


def _defence_label(defence: str) -> str:
    if defence == "none":
        return "none"
    kind, value = defence.split(":")
    return {"noise": f"noise σ={value}×RMS", "perturb": f"perturbed local layers ε={value}",
            "finetune": f"LoRA-fine-tuned local layers, {value} steps"}.get(kind, defence)


def _defences(s: dict) -> list[str]:
    """Defence labels in table order; data from before the fine-tune defence has no finetune_steps."""
    return (["none"] + [f"noise:{x:g}" for x in s["noise_sigmas"]] + [f"perturb:{x:g}" for x in s["perturb_eps"]]
            + [f"finetune:{x}" for x in s.get("finetune_steps", [])])


def _finetune_note(data: dict) -> str:
    """One sentence per fine-tune run: its size and what training did (empty for data without one)."""
    parts = []
    for steps, f in data.get("finetune", {}).items():
        parts.append(f"{steps} steps (rank {f['rank']}, lr {f['lr']:g}, batch {f['batch']}×{f['seq_len']} tokens): "
                     f"local weights moved by {100 * f['relative_weight_change_mean']:.1f}% (mean relative Frobenius), "
                     f"training-text loss {f['ce_before']:.3f} → {f['ce_after']:.3f}, sent states "
                     f"{100 * f['state_distance_after']:.1f}% from the public head's, {f['seconds']:.0f} s")
    if not parts:
        return ""
    return (" Fine-tuned heads are LoRA-trained on the attackers' training text (never the held-out text), "
            "attacked like perturbed weights: " + "; ".join(parts) + ".")


def render(data: dict[str, Any]) -> str:
    s = data["settings"]
    summary = data["summary"]
    depths = s["depths"]
    attackers = [a for a in s["attackers"]]
    kinds = [k for k in KIND_ORDER if any(r["kind"] == k and r["direction"] == "input" for r in summary)]
    lines: list[str] = []
    prov = data

    lines.append(f"Command: `{prov.get('command', '?')}` — commit {prov.get('commit', '?')}, {prov.get('date', '?')}, "
                 f"torch threads {s['threads']}, total {data['seconds']['total'] / 60:.1f} min.")
    lines.append("")
    lines.append("**Input direction, no defence — token top-1 accuracy, % [95% bootstrap CI over sequences]**")
    lines.append("")
    lines.append("| attacker | text | " + " | ".join(f"k={k}" for k in depths) + " |")
    lines.append("|---|---|" + "---|" * len(depths))
    for a in attackers:
        for kind in kinds:
            cells = [_pct((_find(summary, direction="input", attacker=a, depth=k, defence="none", kind=kind) or {}).get("token_accuracy"))
                     for k in depths]
            lines.append(f"| {ATTACKER_NAMES.get(a, a)} | {kind} | " + " | ".join(cells) + " |")
    lines.append("")

    lines.append("**Input direction, no defence — exact-sequence rate %, personal-data fields recovered % (chat), "
                 "attacker seconds per token (all kinds)**")
    lines.append("")
    lines.append("| attacker | measure | " + " | ".join(f"k={k}" for k in depths) + " |")
    lines.append("|---|---|" + "---|" * len(depths))
    for a in attackers:
        rows = {"exact sequences": [], "PII fields (chat)": [], "s / token": []}
        for k in depths:
            allrow = _find(summary, direction="input", attacker=a, depth=k, defence="none", kind="all") or {}
            chat = _find(summary, direction="input", attacker=a, depth=k, defence="none", kind="chat") or {}
            rows["exact sequences"].append(_pct(allrow.get("exact_sequence_rate")))
            rows["PII fields (chat)"].append(_pct(chat.get("pii_recovery")))
            spt = allrow.get("seconds_per_token")
            extra = ""
            if a == "whitebox" and "candidates_per_token" in allrow:
                extra = f" ({allrow['candidates_per_token']:.0f} cand.)"
            rows["s / token"].append(f"{spt:.4f}{extra}" if spt is not None else "–")
        for measure, cells in rows.items():
            lines.append(f"| {ATTACKER_NAMES.get(a, a)} | {measure} | " + " | ".join(cells) + " |")
    lines.append("")

    d = s["defence_depth"]
    defences = _defences(s)
    quality = {q["defence"]: q for q in data["quality"]}
    lines.append(f"**Defences at k={d} — input-direction token accuracy % (all kinds) [CI], output-direction "
                 f"accuracy %, and the quality cost**")
    lines.append("")
    lines.append("| defence | " + " | ".join(ATTACKER_NAMES.get(a, a).split(" (")[0] for a in attackers)
                 + " | output (read generated tokens) | greedy outputs identical | greedy token agreement | perplexity (ratio) |")
    lines.append("|---|" + "---|" * (len(attackers) + 4))
    for df in defences:
        cells = []
        for a in attackers:
            row = _find(summary, direction="input", attacker=a, depth=d, defence=df, kind="all")
            cells.append(_pct(row.get("token_accuracy")) if row else "–")
        out = _find(summary, direction="output", attacker="output", depth=d, defence=df, kind="all")
        q = quality.get(df, {})
        ppl = f"{q['perplexity']:.2f} (×{q['perplexity_ratio']:.3f})" if q else "–"
        ident = f"{100 * q['greedy_identical_rate']:.0f}%" if q.get("greedy_identical_rate") is not None else "–"
        agree = f"{100 * q['greedy_token_agreement']:.0f}%" if q.get("greedy_token_agreement") is not None else "–"
        lines.append(f"| {_defence_label(df)} | " + " | ".join(cells) + f" | {_pct(out.get('token_accuracy')) if out else '–'} | "
                     f"{ident} | {agree} | {ppl} |")
    lines.append("")
    note = (f"The no-defence row attacks all {s['n_per_kind']} sequences per kind; defence rows attack the first "
            f"{s['defence_n_per_kind']} per kind. The white-box attacker under noise knows σ and compares at least 64 "
            f"candidates; under perturbed weights it accepts a candidate 2× nearer than the runner-up; in both it scans "
            f"at most {s['defence_max_scan']} candidates per position.") + _finetune_note(data)
    lines.append(note)
    lines.append("")

    out_kinds = [k for k in KIND_ORDER if _find(summary, direction="output", defence="none", kind=k)]
    lines.append(f"**Output direction (k={d}, tail = last {s['model_layers'] - _resume(data)} layers): the cloud reads "
                 f"the generated tokens from the states it returns — accuracy %, exact %, PII echoed in the answer read %**")
    lines.append("")
    lines.append("| defence | " + " | ".join(out_kinds) + " | exact sequences (all) | PII read (where the answer echoed it) |")
    lines.append("|---|" + "---|" * (len(out_kinds) + 2))
    for df in defences:
        cells = [_pct((_find(summary, direction="output", defence=df, kind=k) or {}).get("token_accuracy")) for k in out_kinds]
        allrow = _find(summary, direction="output", defence=df, kind="all") or {}
        lines.append(f"| {_defence_label(df)} | " + " | ".join(cells) + f" | {_pct(allrow.get('exact_sequence_rate'))} | "
                     f"{_pct(allrow.get('pii_recovery'))} |")
    lines.append("")

    lines.append("**The price of depth** (identical outputs; only local compute grows)")
    lines.append("")
    lines.append("| k | local layers | local head ms / token (prefill, this CPU) |")
    lines.append("|---|---|---|")
    for k, c in sorted(data["depth_cost"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {k} | {c['local_layers']} of {c['of']} | {c['head_ms_per_token_prefill']:.2f} |")
    lines.append("")
    secs = data["seconds"]
    lines.append("Run time by phase (s): " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
    return "\n".join(lines)


def value(data: dict[str, Any], parts: list[str]) -> str:
    """One number for prose, by path (the docs write `<!--v:inv/...-->`):

        acc/<attacker>/<depth>/<defence>/<kind>    token accuracy, "%"; attacker "output" reads answers
        exact/<attacker>/<depth>/<defence>/<kind>  exact-sequence rate, "%"
        spt/<attacker>/<depth>/<defence>/<kind>    attacker seconds per token
        ppl/<defence>, agree/<defence>             quality cost: perplexity ratio, greedy token agreement
        minutes                                    the run's wall time
    """
    what, *key = parts
    if what == "minutes":
        return f"{data['seconds']['total'] / 60:.1f}"
    if what in ("ppl", "agree"):
        q = next((q for q in data["quality"] if q["defence"] == key[0]), None)
        if q is None:
            raise KeyError(f"no quality row for defence {key[0]!r}")
        return f"×{q['perplexity_ratio']:.2f}" if what == "ppl" else f"{100 * q['greedy_token_agreement']:.0f}%"
    attacker, depth, defence, kind = key
    direction = "output" if attacker == "output" else "input"
    row = _find(data["summary"], direction=direction, attacker=attacker, depth=int(depth), defence=defence, kind=kind)
    if row is None:
        raise KeyError(f"no {direction} result for {attacker} at depth {depth}, {defence}, {kind}")
    if what == "spt":
        return f"{row['seconds_per_token']:.3f}"
    metric = {"acc": "token_accuracy", "exact": "exact_sequence_rate"}[what]
    return f"{100 * row[metric]['mean']:.1f}%"


def _resume(data: dict) -> int:
    L = data["settings"]["model_layers"]
    return max(L - 2, data["settings"]["defence_depth"] + 1)


def plot(data: dict[str, Any], path: Path) -> Path:
    import numpy as np

    from ..experiments.plots import plt, save

    s, summary = data["settings"], data["summary"]
    depths = s["depths"]
    kinds = [k for k in ("prose", "chat", "random") if any(r["kind"] == k for r in summary)]
    fig = plt.figure(figsize=(4.4 * max(3, len(kinds)), 8.2))
    grid = fig.add_gridspec(2, len(kinds))
    colours = {a: f"C{i}" for i, a in enumerate([*INPUT_ORDER, "output"])}
    for j, kind in enumerate(kinds):
        ax = fig.add_subplot(grid[0, j])
        for a in s["attackers"]:
            rows = [_find(summary, direction="input", attacker=a, depth=k, defence="none", kind=kind) for k in depths]
            ys = [100 * r["token_accuracy"]["mean"] if r else float("nan") for r in rows]
            lo = [y - 100 * r["token_accuracy"]["ci95"][0] if r else 0 for y, r in zip(ys, rows)]
            hi = [100 * r["token_accuracy"]["ci95"][1] - y if r else 0 for y, r in zip(ys, rows)]
            ax.errorbar(depths, ys, yerr=[lo, hi], marker="o", capsize=3, color=colours.get(a), label=ATTACKER_NAMES.get(a, a))
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(k) for k in depths])
        ax.set_ylim(-3, 103)
        ax.set_xlabel("local layers before the wire (k)")
        ax.set_title(f"input direction, {kind} (no defence)")
        ax.grid(alpha=0.3)
        if j == 0:
            ax.set_ylabel("tokens recovered, % (95% CI)")
            ax.legend(fontsize=7, loc="lower left")

    ax = fig.add_subplot(grid[1, :])
    d = s["defence_depth"]
    quality = {q["defence"]: q for q in data["quality"]}
    defences = _defences(s)
    series = [("input", a) for a in s["attackers"]] + [("output", "output")]
    width = 0.8 / len(series)
    x = np.arange(len(defences))
    for i, (direction, a) in enumerate(series):
        ys, err = [], [[], []]
        for df in defences:
            row = _find(summary, direction=direction, attacker=a, depth=d, defence=df, kind="all")
            y = 100 * row["token_accuracy"]["mean"] if row else float("nan")
            ys.append(y)
            err[0].append(y - 100 * row["token_accuracy"]["ci95"][0] if row else 0)
            err[1].append(100 * row["token_accuracy"]["ci95"][1] - y if row else 0)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, ys, width, yerr=err, capsize=2, color=colours.get(a),
               label=ATTACKER_NAMES.get(a, a))
    labels = []
    for df in defences:
        q = quality.get(df)
        cost = f"\nppl ×{q['perplexity_ratio']:.2f}, greedy agree {100 * q['greedy_token_agreement']:.0f}%" if q else ""
        short = _defence_label(df).replace("perturbed local layers", "perturbed").replace("LoRA-fine-tuned local layers,", "LoRA")
        labels.append(short + cost)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 122)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("tokens recovered, %")
    ax.set_title(f"defences at k={d}: attack accuracy (all kinds) and quality cost (below each group)")
    ax.legend(fontsize=7, ncol=len(series), loc="upper center")
    ax.grid(alpha=0.3, axis="y")
    return save(fig, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "experiment_data/inversion.json")
    print(render(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
