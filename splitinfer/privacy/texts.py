"""Text for the inversion experiment: held-out kinds no attacker trained on, and a training corpus.

Held out (attacked):
  prose   - paragraphs of ordinary English written for this file (in no corpus on the machine);
  chat    - chat-template prompts carrying synthetic personal data (name, e-mail, phone) drawn from a
            seeded RNG, exactly as the local side would encode them;
  random  - uniformly random token ids (the specials excepted).

Training (only for the learned attackers, from other sources already on the machine, never downloaded):
  Python standard-library docstrings, and license texts / documentation under /usr/share when present.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

PROSE = [
    "The old lighthouse keeper climbed the spiral stairs every evening, carrying a lantern and a flask of strong tea. "
    "From the top he could see the fishing boats returning, their lights bobbing like fireflies on the dark water.",
    "Maria had never liked the smell of hospitals, but she sat beside her grandmother's bed for hours, reading aloud "
    "from a battered paperback about sailors and storms until the nurse turned down the lights.",
    "When the bakery on the corner finally closed, the whole street seemed quieter. People still walked past the empty "
    "window in the mornings, half expecting to smell bread, and a few of them left notes taped to the glass.",
    "The committee met on a wet Tuesday to decide the future of the village hall. After two hours of polite argument, "
    "they agreed to repaint the doors, fix the leaking roof and postpone everything else until spring.",
    "My brother learned to swim late, at eleven, in a cold lake with reeds that brushed his ankles. He still claims "
    "that the fear of those reeds taught him more than any instructor ever did.",
    "Early trains are full of small rituals: the man who folds his newspaper into perfect quarters, the student "
    "asleep against the window, the conductor who greets every regular passenger by name.",
    "The garden had gone wild while the house stood empty. Brambles covered the path, the apple trees leaned toward "
    "the fence, and a family of foxes had made a den beneath the collapsed shed.",
    "She kept a notebook of words she liked, copied from menus, street signs and the backs of seed packets. By the "
    "end of the year it held more than two thousand of them, and none of them were repeated.",
    "On the night of the storm the power failed across the valley. Neighbours who had never spoken shared candles, "
    "soup and batteries, and by morning the whole road knew each other's names.",
    "The museum's smallest room contains a single painting of a pear on a blue plate. Visitors often walk past it, "
    "yet the guards say that the ones who stop tend to stay for a very long time.",
    "Every autumn my aunt made jam from the blackberries along the railway line. The jars were labelled in pencil, "
    "stacked in the cellar and handed out at Christmas to anyone who visited.",
    "The bridge was built in nine months by a crew of forty, most of whom had never worked on anything taller than "
    "a barn. It has outlasted two floods and the company that designed it.",
    "He practised the violin in the kitchen because the tiles made it sound better. The neighbours complained at "
    "first, then stopped, and eventually one of them asked whether he gave lessons.",
    "A good map leaves things out. The people who draw them spend as much time deciding what to ignore as they do "
    "measuring roads, rivers and the slow curve of the coastline.",
    "After the harvest the farmers gathered in the square to trade stories about the weather, the price of diesel "
    "and the new tractor that nobody quite knew how to repair.",
    "The letter arrived thirty years late, its stamp faded and its envelope soft as cloth. Inside, in careful "
    "handwriting, someone had written to say that the roses had finally bloomed.",
]

FIRST = ["Agnieszka", "Tomasz", "Chiamaka", "Lars", "Mei", "Rafael", "Siobhan", "Dmitri", "Aiyana", "Kenji",
         "Fatima", "Oskar", "Priyanka", "Matteo", "Ingrid", "Kwame", "Ludmila", "Esteban", "Noor", "Hamish"]
LAST = ["Wolanski", "Okafor", "Lindqvist", "Tanaka", "Oyelaran", "Brennan", "Castellano", "Petrov", "Nakamura",
        "Haddad", "Quist", "Delacroix", "Mbeki", "Fairweather", "Szabo", "Ramanathan", "Kowalczyk", "Abernathy"]
DOMAINS = ["example.org", "example.com", "mail.example.net", "inbox.example"]
TEMPLATES = [
    "Hi, I'm {name}. Please email me at {email} or call {phone} about my order.",
    "Write a short reminder for {name} ({email}, {phone}) about tomorrow's dentist appointment.",
    "My name is {name}, my phone number is {phone} and my e-mail is {email}. Can you update my address?",
    "Draft a polite reply to {name} at {email} saying I will phone them on {phone} next week.",
    "Contact details for the new tenant: {name}, {phone}, {email}. Summarise them in one line.",
    "Please forward the invoice to {email}; the account holder is {name} and her mobile is {phone}.",
]
PII_FIELDS = ("name", "email", "phone")


@dataclass
class Text:
    kind: str
    ids: list[int]
    text: str = ""
    pii: dict[str, str] = field(default_factory=dict)


def personal_data(rng: random.Random) -> dict[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    email = f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"
    phone = f"+{rng.choice([1, 44, 49, 61])} {rng.randint(200, 999)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
    return {"name": f"{first} {last}", "email": email, "phone": phone}


def held_out(
    tokenizer,
    vocab_size: int,
    n_per_kind: int,
    prose_tokens: int,
    random_tokens: int,
    seed: int,
    kinds: Sequence[str] = ("prose", "chat", "random"),
) -> list[Text]:
    """The attacked sequences, deterministic for a seed.  `tokenizer` None (tiny test models): random only."""
    rng = random.Random(seed)
    out: list[Text] = []
    if tokenizer is not None and "prose" in kinds:
        for text in PROSE[:n_per_kind]:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][:prose_tokens]
            out.append(Text("prose", ids, tokenizer.decode(ids)))
    if tokenizer is not None and "chat" in kinds:
        for _ in range(n_per_kind):
            pii = personal_data(rng)
            text = rng.choice(TEMPLATES).format(**pii)
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            out.append(Text("chat", list(ids), text, pii))
    if "random" in kinds:
        specials = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
        pool = [t for t in range(vocab_size) if t not in specials]
        for _ in range(n_per_kind):
            ids = [rng.choice(pool) for _ in range(random_tokens)]
            out.append(Text("random", ids, tokenizer.decode(ids) if tokenizer is not None else ""))
    return out


# ---------------------------------------------------------------------------- training corpus


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings of the Python standard library's top-level modules (parsed, never imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


def share_texts(max_files: int = 400, max_chars: int = 6000) -> list[str]:
    """License texts and plain documentation under /usr/share, where the machine has them."""
    texts = []
    for pattern in ("/usr/share/common-licenses/*", "/usr/share/doc/*/copyright", "/usr/share/doc/*/README*"):
        for path in sorted(Path("/").glob(pattern.lstrip("/")))[:max_files]:
            if path.is_file() and path.suffix not in (".gz", ".bz2", ".xz", ".html"):
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                texts += [p.strip() for p in text[:max_chars].split("\n\n") if len(p.strip()) >= 200]
    return texts


def training_sequences(
    tokenizer, n_tokens: int, seq_len: int, seed: int, chat_fraction: float = 0.25
) -> tuple[list[list[int]], dict]:
    """Token sequences totalling about n_tokens, shuffled from the sources above.

    A quarter of them are wrapped in the (public) chat template, since the attacker knows how prompts are
    formatted; none of them is held-out text.
    """
    rng = random.Random(seed)
    docs = stdlib_docstrings()
    share = share_texts()
    pool = [("stdlib", d) for d in docs] + [("share", d) for d in share]
    rng.shuffle(pool)
    held = set(PROSE)
    seqs, used, total = [], {"stdlib": 0, "share": 0, "chat_wrapped": 0}, 0
    for source, text in pool:
        if total >= n_tokens:
            break
        if text in held:
            continue
        if tokenizer.chat_template and rng.random() < chat_fraction:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text[:600]}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            ids = list(ids)[: seq_len + 40]
            used["chat_wrapped"] += 1
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][:seq_len]
        if len(ids) < 8:
            continue
        seqs.append(ids)
        used[source] += 1
        total += len(ids)
    return seqs, {"sequences": len(seqs), "tokens": total, "documents": used,
                  "available": {"stdlib_docstrings": len(docs), "share_paragraphs": len(share)}}


def random_sequences(vocab_size: int, n_tokens: int, seq_len: int, seed: int, exclude: Callable[[int], bool] | None = None) -> list[list[int]]:
    """Uniform random sequences the attacker draws itself (a different seed from the held-out ones)."""
    rng = random.Random(seed)
    pool = [t for t in range(vocab_size) if not (exclude and exclude(t))]
    return [[rng.choice(pool) for _ in range(seq_len)] for _ in range(max(1, n_tokens // seq_len))]
