"""The draft head at run time: its candidates join lookahead's tree, and the output stays greedy's.

Three kinds of drafter: a fake one over FakeLM (fast; checks what lookahead tells a session), the real
`Drafter` with a randomly initialised head (any guess is wrong: the tokens must not change), and the real
`Drafter` around an oracle head that returns exactly the base model's next feature (so every drafted
top-1 token is greedy's: acceptance ~100%, which fails if the pairs (f_i, x_{i+1}) are off by one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from splitinfer import decoding, drafting, hf
from splitinfer.cli import drafter_problem
from splitinfer.decoding.budget import DraftBudget
from splitinfer.decoding.lookahead import SOURCES, Memory, lookahead
from splitinfer.decoding.sequential import sequential
from splitinfer.decoding.strategies import STRATEGIES, make
from splitinfer.decoding.tree import DRAFT_BINS, Calibration, Draft, Trie, build, draft_kind
from splitinfer.drafting.draft import Drafter
from splitinfer.drafting.head import DraftConfig, DraftHead, save
from splitinfer.engine import SplitModel
from splitinfer.models import load_config
from splitinfer.testing import FakeLM

from conftest import reference_model, split_model

CHECKOUT = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 17, 42, 8, 8, 31], [1, 2, 3], list(range(40, 90, 3)), [7]]


# -- a fake drafter over FakeLM -----------------------------------------------------------------------------------


class FakeClock:
    """Milliseconds that pass only when something says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms / 1000.0


class TimedLM(FakeLM):
    """A FakeLM whose every forward takes `step_ms` of the fake clock."""

    def __init__(self, clock: FakeClock, step_ms: float, **kw):
        super().__init__(**kw)
        self.clock, self.step_ms = clock, step_ms

    def forward(self, tokens, parents=None, *, features=False):
        self.clock.spend(self.step_ms)
        return super().forward(tokens, parents, features=features)


class FakeSession:
    """Drafts the FakeLM's own greedy continuation (prob 0.9) beside one wrong sibling (prob 0.05) per level;
    checks every observed feature is the one at its own token's position."""

    def __init__(self, lm: FakeLM, clock: FakeClock | None, level_ms: float, wrong: bool):
        self.lm, self.clock, self.level_ms, self.wrong = lm, clock, level_ms, wrong
        self.context: list[int] = []
        self.depths: list[int] = []  # the depth asked for at each step

    def observe(self, tokens, features) -> None:
        assert len(tokens) == len(features)
        for i, token in enumerate(tokens):  # f_i belongs to x_i: its context ends with x_i
            assert features[i].tolist() == self.lm.feature(self.context + list(tokens[: i + 1])).tolist()
        self.context += list(tokens)
        if self.clock:
            self.clock.spend(0.5)

    def propose(self, root, depth, top_k, clock) -> Draft:
        self.depths.append(depth)
        draft, context, parent = Draft(), [*self.context, root], -1
        for _ in range(depth):
            t0 = clock()
            right = self.lm.rule(context)
            guess = (right + 1) % self.lm.vocab if self.wrong else right
            draft.add(parent, (guess + 1) % self.lm.vocab, 0.05)
            parent = draft.add(parent, guess, 0.9)
            context.append(guess)
            if self.clock:
                self.clock.spend(self.level_ms)
            draft.level_ms.append((clock() - t0) * 1000.0)
        return draft


class FakeDrafter:
    def __init__(self, lm: FakeLM, clock: FakeClock | None = None, level_ms: float = 0.0, wrong: bool = False):
        self.lm, self.clock, self.level_ms, self.wrong = lm, clock, level_ms, wrong
        self.sessions: list[FakeSession] = []

    def session(self) -> FakeSession:
        self.sessions.append(FakeSession(self.lm, self.clock, self.level_ms, self.wrong))
        return self.sessions[-1]


class NoFeaturesLM(FakeLM):
    def forward(self, tokens, parents=None, *, features=False):
        assert not features, "features asked for without a drafter"
        return super().forward(tokens, parents)


def draft_acceptance(memory: Memory) -> float:
    """Accepted / tested over the drafted kinds the calibration has seen."""
    kinds = [k for k in memory.calibration.tested if k[0] == "draft"]
    tested = sum(memory.calibration.tested[k] for k in kinds)
    return sum(memory.calibration.hits[k] for k in kinds) / tested if tested else 0.0


@pytest.mark.parametrize("prompt", [[1, 2, 3, 4], [7, 7, 7], [3]])
@pytest.mark.parametrize("max_verify", [None, 6])
def test_a_session_is_told_each_committed_token_with_its_own_feature(prompt, max_verify):
    lm = FakeLM(vocab=10_000, rule=lambda ctx: 1000 + len(ctx) % 37)
    drafter = FakeDrafter(lm)
    steps = lookahead(lm, prompt, 60, frozenset(), drafter=drafter, max_verify=max_verify)
    tokens = []
    for out in steps:
        tokens += out
        assert drafter.sessions[0].context == lm.context  # in step with what the model committed
    assert tokens == lm.greedy(prompt, 60)


def test_a_perfect_fake_drafter_is_accepted_whole():
    lm = FakeLM(vocab=10_000, rule=lambda ctx: 1000 + len(ctx))  # nothing repeats: no model-free guess
    memory = Memory()
    result = decoding.run(lookahead(lm, [1, 2], 61, frozenset(), drafter=FakeDrafter(lm), max_verify=16,
                                    draft_depth=5, memory=memory, sources=frozenset({"draft"})))
    assert result.tokens == lm.greedy([1, 2], 61)
    assert result.per_step == [6] * 10  # five drafted tokens and the bonus, every step
    assert draft_acceptance(memory) > 0.45  # each right node's wrong sibling is tested too


def test_a_wrong_fake_drafter_changes_nothing_but_speed():
    lm = FakeLM(vocab=10_000, rule=lambda ctx: 1000 + len(ctx))
    memory = Memory()
    result = decoding.run(lookahead(lm, [1, 2], 30, frozenset(), drafter=FakeDrafter(lm, wrong=True),
                                    max_verify=16, memory=memory, sources=frozenset({"draft"})))
    assert result.tokens == lm.greedy([1, 2], 30) and result.per_step == [1] * 29
    assert draft_acceptance(memory) == 0.0


@pytest.mark.parametrize("max_new", [1, 2, 17])
def test_the_token_budget_and_eos_cut_a_drafted_run(max_new):
    lm = FakeLM(vocab=10_000, rule=lambda ctx: 1000 + len(ctx))
    got = decoding.run(lookahead(lm, [1, 2], max_new, frozenset(), drafter=FakeDrafter(FakeLM(vocab=10_000))))
    assert got.tokens == lm.greedy([1, 2], max_new)
    free = lm.greedy([1, 2], 40)
    eos = free[13]
    lm = FakeLM(vocab=10_000, rule=lambda ctx: 1000 + len(ctx))
    got = decoding.run(lookahead(lm, [1, 2], 40, frozenset({eos}), drafter=FakeDrafter(lm), max_verify=8))
    assert got.tokens == free[:14]


def test_sources_pick_the_drafter_the_model_free_guesses_or_both():
    prompt = PROMPTS[2]
    want = FakeLM().greedy(prompt, 40)
    for sources in (frozenset({"draft"}), SOURCES - {"draft"}, SOURCES):
        lm = FakeLM() if "draft" in sources else NoFeaturesLM()
        drafter = FakeDrafter(lm)
        assert decoding.run(lookahead(lm, prompt, 40, frozenset(), drafter=drafter, sources=sources)).tokens == want
        assert len(drafter.sessions) == ("draft" in sources)


def test_without_a_drafter_the_model_is_never_asked_for_features():
    for mode in STRATEGIES:
        lm = NoFeaturesLM()
        got = decoding.run(make(mode, Memory())(lm, PROMPTS[0], 30, frozenset()))
        assert got.tokens == FakeLM().greedy(PROMPTS[0], 30)


def test_the_registry_hands_the_drafter_to_lookahead_only():
    for mode in STRATEGIES:
        lm = FakeLM()
        drafter = FakeDrafter(lm)
        got = decoding.run(make(mode, Memory(), drafter)(lm, PROMPTS[1], 20, frozenset()))
        assert got.tokens == FakeLM().greedy(PROMPTS[1], 20)
        assert len(drafter.sessions) == (mode == "lookahead")


# -- the tree pieces -----------------------------------------------------------------------------------------------


def test_drafted_nodes_carry_their_probability_bin_and_calibrate_from_its_centre():
    assert draft_kind(1, 0.93) == ("draft", 1, 9) and draft_kind(12, 1.0) == ("draft", 7, DRAFT_BINS - 1)
    calibration = Calibration()
    assert calibration.p(("draft", 2, 3)) == pytest.approx(0.35)
    draft = Draft()
    a = draft.add(-1, 5, 0.8)
    draft.add(-1, 6, 0.1)
    b = draft.add(a, 7, 0.5)
    draft.add(b, 8, 0.9)
    assert draft.scores == pytest.approx([0.8, 0.1, 0.4, 0.36]) and draft.depths == [1, 1, 2, 3]
    assert draft.best(3) == [0, 2, 3]  # the three best form a tree: parents first
    assert draft.path(3) == ([5, 7, 8], [("draft", 1, 8), ("draft", 2, 5), ("draft", 3, 9)])
    trie = Trie()
    trie.insert([5, 9], "suffix", 2)
    for node in draft.best(4):
        tokens, kinds = draft.path(node)
        trie.insert(tokens, "draft", kinds=kinds)
    assert trie.next[5].kind == ("suffix", 0, 2)  # the first to propose an edge keeps it
    assert trie.next[5].next[7].next[8].kind == ("draft", 3, 9) and trie.next[6].kind == ("draft", 1, 1)
    tree = build(4, trie, lambda c: ([], 0), [0], calibration, 10)
    assert sorted(tree.kinds[1:]) == sorted([("suffix", 0, 2), ("suffix", 1, 2), ("draft", 1, 1), ("draft", 2, 5),
                                             ("draft", 3, 9)])


# -- how deep to draft ---------------------------------------------------------------------------------------------


def settled_depth(step_ms: float, level_ms: float = 4.0) -> int:
    budget = DraftBudget(explore=0)
    for _ in range(40):
        depth = budget.depth(6)
        budget.observe(step_ms, 1.0, [level_ms] * depth, 1.2, [0.6 * 0.7**level for level in range(depth)])
    return budget.depth(6)


def test_the_draft_depth_is_deep_behind_a_slow_link_and_shallow_on_a_slow_cpu():
    assert settled_depth(5.0) == 0  # drafting a level costs most of a step: not worth it
    assert settled_depth(85.0) >= 4  # an 80 ms round trip: every level is cheap next to it
    assert settled_depth(85.0, level_ms=0.1) == 6
    fresh = DraftBudget()
    assert fresh.depth(5) == 5  # nothing measured: every level once


def test_exploration_drafts_one_level_deeper_now_and_then():
    budget = DraftBudget(explore=4)
    budget.observe(5.0, 1.0, [4.0] * 3, 1.2, [0.6, 0.4, 0.2])
    assert [budget.depth(6) for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("rtt_ms, shallow", [(0.0, True), (80.0, False)])
def test_lookahead_drafts_by_the_measured_cost_of_its_steps(rtt_ms, shallow):
    """With a fake clock: a local CPU that takes 10 ms a level drafts little at RTT 0 and deep at 80 ms."""
    clock = FakeClock()
    lm = TimedLM(clock, rtt_ms + 5.0, vocab=10_000, rule=lambda ctx: 1000 + len(ctx))
    drafter = FakeDrafter(lm, clock, level_ms=10.0)
    result = decoding.run(lookahead(lm, [1, 2], 200, frozenset(), drafter=drafter, draft_depth=6, clock=clock))
    assert result.tokens == lm.greedy([1, 2], 200)
    depths = drafter.sessions[0].depths[5:]  # once the first measurements are in
    mean = sum(depths) / len(depths)
    assert (mean <= 1.5) if shallow else (mean >= 4)


# -- the real Drafter on tiny models -------------------------------------------------------------------------------


def random_drafter(lm: SplitModel, model_dir: Path, draft_vocab: int | None = None, seed: int = 0) -> Drafter:
    torch.manual_seed(seed)
    head = DraftHead(DraftConfig.from_base(load_config(model_dir), draft_vocab)).eval()
    if draft_vocab is not None:  # a draft vocabulary in no particular order
        head.d2t = torch.randperm(load_config(model_dir).vocab_size)[:draft_vocab]
    return Drafter.of(head, lm.head, lm.tail)


def greedy(model_dir: Path, prompt: list[int], max_new: int, eos: frozenset[int] = frozenset(), **kw) -> list[int]:
    return decoding.run(sequential(split_model(model_dir, **kw), prompt, max_new, eos)).tokens


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_random_drafter_leaves_the_tokens_greedy(tiny_model, prompt):
    want = greedy(tiny_model, prompt, 30)
    for draft_vocab, max_verify in [(None, 12), (64, None)]:
        lm = split_model(tiny_model)
        drafter = random_drafter(lm, tiny_model, draft_vocab)
        got = decoding.run(lookahead(lm, prompt, 30, frozenset(), drafter=drafter, max_verify=max_verify,
                                     draft_depth=4, draft_top_k=3))
        assert got.tokens == want, (draft_vocab, max_verify)


def test_edge_cases_with_a_drafter(tiny_llama):
    prompt = list(range(3, 30))
    free = greedy(tiny_llama, prompt, 24)
    options = {"draft_depth": 3, "draft_top_k": 4}
    for max_new in (1, 2):
        lm = split_model(tiny_llama)
        drafter = random_drafter(lm, tiny_llama)
        got = decoding.run(lookahead(lm, prompt, max_new, frozenset(), drafter=drafter, **options))
        assert got.tokens == free[:max_new]
    eos = free[9]
    lm = split_model(tiny_llama)
    got = decoding.run(lookahead(lm, prompt, 24, frozenset({eos}), drafter=random_drafter(lm, tiny_llama), **options))
    assert got.tokens == free[: free.index(eos) + 1]
    lm = split_model(tiny_llama)
    lm.span.max_step_tokens = 8  # prefill in four chunks, trees of at most 8 nodes
    got = decoding.run(lookahead(lm, prompt, 24, frozenset(), drafter=random_drafter(lm, tiny_llama), **options))
    assert got.tokens == free and max(t.tokens for t in lm.timings) <= 8


class Recording:
    """A drafter that keeps the sessions it hands out."""

    def __init__(self, drafter: Drafter):
        self.drafter, self.sessions = drafter, []

    def session(self):
        self.sessions.append(self.drafter.session())
        return self.sessions[-1]


def test_the_head_cache_holds_one_pair_per_committed_token_but_the_last(tiny_llama):
    lm = split_model(tiny_llama)
    drafter = Recording(random_drafter(lm, tiny_llama))
    for _ in lookahead(lm, PROMPTS[2], 30, frozenset(), drafter=drafter, draft_depth=4, draft_top_k=4):
        session = drafter.sessions[0]
        assert session.length == hf.cache_length(session.cache) == lm.length - 1


class OracleHead(DraftHead):
    """Returns exactly the base model's next feature: reads each pair's token back from its embedding, keeps
    (token, input feature) in the cache it is given, and runs the unsplit model over the context each query
    sees through its mask.  Checks on the way that the pair at position i is (f_i, x_{i+1})."""

    def __init__(self, config: DraftConfig, model_dir: Path, first: int):
        super().__init__(config)
        self.model_dir, self.first = model_dir, first

    def features(self, context: list[int]) -> torch.Tensor:  # [len, H] final-norm outputs of the unsplit model
        return reference_model(self.model_dir).model(torch.tensor([context])).last_hidden_state[0]

    def forward(self, features, embeds, positions, mask, cache):
        table = reference_model(self.model_dir).get_input_embeddings().weight  # [vocab, H]
        ids = torch.cdist(embeds[0].float(), table).argmin(-1)  # [q]
        entries = torch.cat([features[0].float(), ids[:, None].float()], dim=-1)[None, None]  # [1, 1, q, H + 1]
        held, _ = cache.update(entries, entries, 0)  # every entry so far, this block's last
        out = []
        for r in range(len(ids)):
            seen = held[0, 0, mask[0, 0, r] == 0]  # [visible, H + 1]: the committed pairs and the row's ancestors
            context = [self.first, *seen[:, -1].long().tolist()]
            assert positions[0, r] == len(context) - 2, "the pair (f_i, x_{i+1}) sits at position i"
            truth = self.features(context)
            given = torch.nn.functional.cosine_similarity(features[0, r].float(), truth[-2], dim=0)
            assert given > 0.99, "the pair's feature is f_i, computed at x_i"
            out.append(truth[-1])
        return torch.stack(out)[None]


def oracle_drafter(lm: SplitModel, model_dir: Path, first: int, wrong: bool = False) -> Drafter:
    head = OracleHead(DraftConfig.from_base(load_config(model_dir)), model_dir, first)
    weight = lm.tail.lm_head.weight
    return Drafter(head, lm.head.embed, weight.roll(1, dims=0) if wrong else weight)  # wrong: token t scored as t+1


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_an_oracle_drafter_is_accepted_almost_always(tiny_llama, prompt):
    want = greedy(tiny_llama, prompt, 41)
    lm, memory = split_model(tiny_llama), Memory()
    drafter = oracle_drafter(lm, tiny_llama, prompt[0])
    got = decoding.run(lookahead(lm, prompt, 41, frozenset(), drafter=drafter, memory=memory, max_verify=16,
                                 draft_depth=4, draft_top_k=2, sources=frozenset({"draft"})))
    assert got.tokens == want
    whole = got.per_step[:-1]  # the last step is cut at the token budget
    assert sum(n == 5 for n in whole) >= 0.8 * len(whole)  # four drafted tokens and the bonus
    drafted = [k for k in memory.calibration.tested if k[0] == "draft"]
    assert sum(memory.calibration.hits[k] for k in drafted) >= 0.9 * 4 * len(whole)


def test_a_wrong_oracle_changes_nothing_and_is_rejected(tiny_llama):
    prompt = PROMPTS[0]
    want = greedy(tiny_llama, prompt, 30)
    lm, memory = split_model(tiny_llama), Memory()
    got = decoding.run(lookahead(lm, prompt, 30, frozenset(), drafter=oracle_drafter(lm, tiny_llama, prompt[0], True),
                                 memory=memory, max_verify=16, draft_depth=4, draft_top_k=2))
    assert got.tokens == want
    assert draft_acceptance(memory) < 0.2


def test_a_random_drafter_on_the_default_model(default_model):
    prompt = [1, 504, 3458, 282, 4649, 314, 3215]
    want = greedy(default_model, prompt, 16)
    lm = split_model(default_model)
    got = decoding.run(lookahead(lm, prompt, 16, frozenset(), drafter=random_drafter(lm, default_model, 2048)))
    assert got.tokens == want


TRAINED = Path(__file__).resolve().parent.parent / "drafters" / "smollm2-135m-instruct"


@pytest.mark.skipif(not (TRAINED / "model.safetensors").is_file(), reason="no committed drafter in this checkout")
def test_the_committed_drafter_is_exact_and_earns_its_place(default_model):
    """The trained head on the default model: lookahead's and Jacobi's tokens equal sequential's (the token
    budget and EOS cuts included), and its drafted nodes are accepted often enough to matter (a head that
    learned nothing scores about 0)."""
    from transformers import AutoTokenizer

    from splitinfer.decoding.jacobi import jacobi
    from splitinfer.drafting.head import load as load_head

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    turn = [{"role": "user", "content": "List the planets of the solar system, one per line."}]
    prompt = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = greedy(default_model, prompt, 40)
    lm = split_model(default_model)
    drafter = Drafter.of(load_head(TRAINED, "cpu", torch.float32), lm.head, lm.tail)
    memory = Memory()
    got = decoding.run(lookahead(lm, prompt, 40, frozenset(), drafter=drafter, memory=memory, max_verify=32))
    assert got.tokens == want
    assert draft_acceptance(memory) > 0.1  # over every drafted node tested, siblings included (measured: 0.19)
    assert decoding.run(jacobi(split_model(default_model), prompt, 40, frozenset())).tokens == want
    for max_new in (1, 2):
        lm = split_model(default_model)
        drafter = Drafter.of(load_head(TRAINED, "cpu", torch.float32), lm.head, lm.tail)
        assert decoding.run(lookahead(lm, prompt, max_new, frozenset(), drafter=drafter)).tokens == want[:max_new]
    stop = want[7]
    lm = split_model(default_model)
    drafter = Drafter.of(load_head(TRAINED, "cpu", torch.float32), lm.head, lm.tail)
    got = decoding.run(lookahead(lm, prompt, 40, frozenset({stop}), drafter=drafter))
    assert got.tokens == want[: want.index(stop) + 1]


# -- finding and loading a drafter ---------------------------------------------------------------------------------


def write_drafter(out: Path, model_dir: Path, draft_vocab: int | None = None) -> Path:
    torch.manual_seed(0)
    save(DraftHead(DraftConfig.from_base(load_config(model_dir), draft_vocab)), out)
    return out


def test_resolve_finds_the_named_the_default_or_no_drafter(tiny_llama, tmp_path, monkeypatch):
    made = write_drafter(tmp_path / "made", tiny_llama)
    assert drafting.resolve(tiny_llama, "none") is None
    assert drafting.resolve(tiny_llama, str(made)) == made
    monkeypatch.setattr(drafting, "CHECKOUT", tmp_path)
    assert drafting.resolve(tiny_llama, None) is None  # no drafters/<model>/ here
    default = write_drafter(tmp_path / "drafters" / tiny_llama.name, tiny_llama)
    assert drafting.resolve(tiny_llama, None) == default
    monkeypatch.setattr(drafting, "CHECKOUT", None)  # installed from a wheel: no default
    assert drafting.resolve(tiny_llama, None) is None


def test_a_drafter_for_another_model_is_refused(tiny_llama, default_model, tmp_path):
    made = write_drafter(tmp_path / "made", tiny_llama)
    with pytest.raises(drafting.DrafterError, match=r"made for hidden_size 64, but the model .* has 576"):
        drafting.resolve(default_model, made)
    (tmp_path / "empty").mkdir()
    empty, absent = tmp_path / "empty", tmp_path / "absent"
    assert drafter_problem(tiny_llama, str(empty)) == f"--drafter {empty}: no config.json in it (not a drafter directory)"
    assert drafter_problem(tiny_llama, str(absent)) == f"--drafter {absent}: no such directory"
    assert drafter_problem(None, "none") is None


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("entry", [["-m", "splitinfer", "chat", "--prompt", "hi"], ["-m", "splitinfer", "serve"],
                                   [str(CHECKOUT / "lookahead_ablation.py"), "--out", "x.json"]],
                         ids=["chat", "serve", "experiment"])
def test_a_bad_drafter_is_one_line(entry, default_model, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"hidden_size": 8, "vocab_size": 5}))
    (wrong / "model.safetensors").write_bytes(b"")
    for drafter, says in [(tmp_path / "absent", "no such directory"), (wrong, "made for hidden_size 8")]:
        done = run(*entry, "--model", str(default_model), "--drafter", str(drafter))
        assert done.returncode == 1 and done.stdout == "", done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --drafter {drafter}: {says}"), done.stderr


def test_the_local_side_loads_a_drafter_and_lookahead_uses_it(default_model, tmp_path):
    from splitinfer.local import LocalSide
    from splitinfer.parts import load_cloud
    from splitinfer.testing import InProcessSpan

    made = write_drafter(tmp_path / "made", default_model, 256)
    local = LocalSide(default_model, drafter=made)
    assert local.drafter_path == made and local.drafter is not None
    assert local.drafter.weight.shape == (256, local.config.hidden_size)  # the LM head's rows d2t, shared
    cloud, _, _ = load_cloud(default_model, local.split, "cpu", local.dtype)
    prompt = local.encode("Name three colours.")
    runs = {mode: local.generate(InProcessSpan(cloud, local.dtype), prompt, 12, mode, memory=Memory())
            for mode in ("sequential", "lookahead")}
    assert runs["lookahead"].token_ids == runs["sequential"].token_ids
    assert LocalSide(default_model, drafter="none").drafter is None


def test_experiment_settings_record_the_drafter():
    from splitinfer.experiments import testbed

    args = SimpleNamespace(threads=None, out="x.json", model=None, drafter=None)
    for path in (None, Path("drafters/m")):
        local = SimpleNamespace(device="cpu", dtype=torch.float32, drafter_path=path)
        assert testbed.settings(args, local)["drafter"] == (str(path) if path else None)


def test_the_ablation_puts_the_drafter_free_figures_beside_the_drafters():
    from splitinfer.decoding.lookahead import SOURCES
    from splitinfer.experiments.ablation import configs

    with_drafter = {c.name: c for c in configs([4], [16, None], 32, 64, 10, drafter=True)}
    assert list(with_drafter)[:2] == ["main 64", "main 64 model-free"]  # the headline, then the figure beside it
    assert with_drafter["main 64"].sources == SOURCES and with_drafter["main 64"].max_verify == 64
    free = SOURCES - {"draft"}
    assert with_drafter["main 64 model-free"].sources == free and with_drafter["main 64 model-free"].per_category == 10
    assert with_drafter["only draft"].sources == {"draft"} and with_drafter["model-free only"].sources == free
    assert with_drafter["budget 16"].sources == SOURCES  # the tree-size sweep drafts
    without = [c.name for c in configs([4], [16], 32, 64, 10, drafter=False)]
    assert "main 64 model-free" not in without and "only draft" not in without
