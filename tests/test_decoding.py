"""Decoding strategies with a fake model: every mode writes exactly the greedy tokens."""

import pytest
import torch

from splitinfer import decoding
from splitinfer.decoding.budget import CostModel
from splitinfer.decoding.drive import drive
from splitinfer.decoding.jacobi import jacobi
from splitinfer.decoding.lookahead import Memory, lookahead
from splitinfer.decoding.sampling import sampler
from splitinfer.decoding.sequential import sequential
from splitinfer.decoding.sources import NgramPool, RecyclingTable, SuffixIndex
from splitinfer.decoding.strategies import STRATEGIES
from splitinfer.decoding.tree import Calibration, Trie, build, verify
from splitinfer.testing import FakeLM

PROMPTS = [[1, 2, 3, 4], [7, 7, 7], [10, 20, 10, 20, 10, 20, 10], [3]]
MODES = {
    "sequential": lambda lm, p, n, eos: sequential(lm, p, n, eos),
    "jacobi": lambda lm, p, n, eos: jacobi(lm, p, n, eos, block=5),
    "lookahead": lambda lm, p, n, eos: lookahead(lm, p, n, eos),
    "lookahead-pinned": lambda lm, p, n, eos: lookahead(lm, p, n, eos, max_verify=12),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("prompt", PROMPTS)
def test_equals_greedy(mode, prompt):
    lm = FakeLM()
    result = decoding.run(MODES[mode](lm, prompt, 60, frozenset()))
    assert result.tokens == FakeLM().greedy(prompt, 60)
    assert sum(result.per_step) == 59 and len(lm.calls) == result.steps + 1


@pytest.mark.parametrize("mode", sorted(MODES))
def test_eos_inside_an_accepted_run(mode):
    prompt = PROMPTS[2]
    free = FakeLM().greedy(prompt, 60)
    eos = free[40]  # first occurrence decides where greedy stops
    want = free[: free.index(eos) + 1]
    assert decoding.run(MODES[mode](FakeLM(), prompt, 60, frozenset({eos}))).tokens == want


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("max_new", [1, 2, 17, 33])
def test_max_new_tokens_inside_an_accepted_run(mode, max_new):
    prompt = PROMPTS[1]
    assert decoding.run(MODES[mode](FakeLM(), prompt, max_new, frozenset())).tokens == FakeLM().greedy(prompt, max_new)


def test_lookahead_commits_several_tokens_per_step_on_repetitive_text():
    lm = FakeLM()
    result = decoding.run(lookahead(lm, PROMPTS[2], 80, frozenset(), max_verify=16))
    assert result.tokens_per_step > 2.0
    assert max(result.per_step) > 3


def test_no_candidate_degrades_to_sequential():
    """A model whose every token is new leaves nothing to guess: one token per step, like sequential."""
    lm = FakeLM(vocab=10_000, rule=lambda ctx: 1000 + len(ctx))
    result = decoding.run(lookahead(lm, [1, 2], 20, frozenset(), max_verify=1))
    assert result.per_step == [1] * 19
    assert lm.calls[1:] == [1] * 19


def test_every_candidate_rejected_still_commits_one_token():
    """Candidates exist (the prompt shows every future token followed by 7) but none matches."""
    lm = FakeLM(vocab=10_000, rule=lambda ctx: 1000 + len(ctx))
    prompt = [x for i in range(20) for x in (1040 + i, 7)]  # 40 tokens: greedy writes 1040, 1041, ...
    result = decoding.run(lookahead(lm, prompt, 30, frozenset(), max_verify=8))
    assert result.tokens == [1040 + i for i in range(30)]
    assert result.per_step == [1] * 29
    assert max(lm.calls[1:]) > 1  # guesses were made and verified


def test_whole_path_accepted():
    """A perfectly periodic text: once calibration trusts the chain, all 8 guesses are accepted + the bonus."""
    lm = FakeLM(vocab=10, rule=lambda ctx: (ctx[-1] + 1) % 10)
    result = decoding.run(lookahead(lm, list(range(10)) * 3, 150, frozenset(), max_verify=9, depth=8))
    assert result.tokens == [(9 + 1 + i) % 10 for i in range(150)]
    # Some step accepted every node it verified (a chain of q nodes) and added the bonus: q tokens.
    assert any(n == q for n, q in zip(result.per_step, lm.calls[1:]) if q > 4)


# --- the driver and the registry ----------------------------------------------------------------


def test_drive_pairs_each_step_with_its_forwards():
    """The prefill's step carries every prompt chunk's forward; each later step carries its one forward."""
    lm = FakeLM(max_step_tokens=4)
    prompt = PROMPTS[2]  # 7 tokens: two prefill chunks of at most 4
    steps = list(drive(lookahead(lm, prompt, 30, frozenset(), max_verify=4), lm))
    assert [s.prefill for s in steps] == [True] + [False] * (len(steps) - 1)
    assert [t.tokens for t in steps[0].timings] == [4, 3]
    assert all(len(s.timings) == 1 for s in steps[1:])
    assert [t.tokens for s in steps for t in s.timings] == lm.calls
    assert [t for s in steps for t in s.tokens] == FakeLM().greedy(prompt, 30)


def test_closing_the_driver_stops_the_strategy():
    lm = FakeLM()
    steps = drive(sequential(lm, [1, 2], 50, frozenset()), lm)
    next(steps), next(steps)
    steps.close()
    assert len(lm.calls) == 2 and lm.pending is None


@pytest.mark.parametrize("mode", sorted(STRATEGIES))
def test_every_factory_takes_the_memory_and_gives_the_greedy_tokens(mode):
    memory = Memory()
    strategy = STRATEGIES[mode](memory)
    assert decoding.run(strategy(FakeLM(), PROMPTS[0], 40, frozenset())).tokens == FakeLM().greedy(PROMPTS[0], 40)
    if mode == "lookahead":  # the memory is the one it learns in
        assert memory.cost.anchor is not None


def test_sampling_has_the_factory_shape():
    strategy = sampler(Memory(), temperature=1e-4)
    assert decoding.run(strategy(FakeLM(), PROMPTS[1], 20, frozenset())).tokens == FakeLM().greedy(PROMPTS[1], 20)


# --- the pieces, against hand-checked examples -------------------------------------------------


def test_verify_follows_the_argmax_through_the_tree():
    trie = Trie()
    trie.insert([5, 6, 7], "suffix")
    trie.insert([5, 8], "ngram")
    trie.insert([9], "ngram")
    tree = build(4, trie, lambda c: ([], 0), [0], Calibration(), 10)
    assert sorted(tree.path_tokens(n)[-1] for n in range(1, len(tree))) == [5, 6, 7, 8, 9]
    node = {tuple(tree.path_tokens(n)): n for n in range(len(tree))}
    predictions = [0] * len(tree)
    predictions[0] = 5
    predictions[node[(4, 5)]] = 8
    predictions[node[(4, 5, 8)]] = 3
    path, bonus = verify(tree, predictions)
    assert path == [0, node[(4, 5)], node[(4, 5, 8)]] and bonus == 3
    predictions[0] = 1
    assert verify(tree, predictions) == ([0], 1)


def test_best_first_prefix_is_a_tree_with_falling_scores():
    trie = Trie()
    trie.insert([1, 2, 3, 4], "suffix")
    tree = build(0, trie, lambda c: ([c[-1] + 10, c[-1] + 20], 1), [0], Calibration(), 12)
    assert all(tree.parents[i] < i for i in range(1, len(tree)))
    assert all(a >= b for a, b in zip(tree.scores[1:], tree.scores[2:]))
    small = tree.truncate(4)
    assert len(small) == 4 and all(p < 4 for p in small.parents)


def test_suffix_index_finds_the_longest_match():
    index = SuffixIndex()
    index.extend([1, 2, 3, 9, 9, 2, 3, 4, 5, 1, 2, 3])
    assert index.continuations([1, 2, 3], depth=3) == ([[9, 9, 2]], 3)
    assert index.continuations([7, 2, 3], depth=2) == ([[4, 5], [9, 9]], 2)
    assert index.continuations([42], depth=2) == ([], 0)


def test_ngram_pool_keeps_recent_continuations():
    pool = NgramPool(n=3, per_key=2)
    pool.add_sequence([1, 2, 3, 1, 4, 5, 1, 6, 7])
    assert pool.lookup(1) == [[6, 7], [4, 5]]


def test_recycling_table():
    table = RecyclingTable(k=2)
    table.update([[1, 3], [1, 3, 4]], torch.tensor([[0.0, 5, 1, 9], [1.0, 0, 0, 0]]))
    assert table.get([1, 3]) == ([3, 1], 2) and table.get([1, 3, 4])[0][0] == 0 and table.get([0, 5]) == ([], 0)
    table.update([[2, 3]], torch.tensor([[9.0, 0, 0, 5]]))
    assert table.get([8, 1, 3]) == ([3, 1], 2)  # the longest context seen wins
    assert table.get([7, 3]) == ([0, 3], 1)  # an unseen pair falls back to the latest for the token


def test_cost_model_prefers_big_trees_only_when_compute_is_cheap():
    scores = [1.0] + [0.5 ** (i / 4) * 0.5 for i in range(63)]
    cpu = CostModel()
    for k, ms in [(1, 90), (8, 110), (16, 135), (30, 170)]:
        cpu.observe(k, ms)
    gpu_wan = CostModel()
    for k, ms in [(1, 100), (16, 101), (64, 103)]:
        gpu_wan.observe(k, ms)
    assert gpu_wan.best_size(scores, 64) > cpu.best_size(scores, 64) > 1
