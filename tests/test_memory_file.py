"""Lookahead's memory kept between processes (memory_file.py): round trip, file mode, bad files, the bound."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from splitinfer.decoding.lookahead import Memory
from splitinfer.decoding.sources import RecyclingTable
from splitinfer.memory_file import FORMAT, MemoryFile, decode, encode, path_for

VOCAB = 50


def learned_memory() -> Memory:
    memory = Memory()
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    memory.recycle.update([[1], [1, 2], [4, 5, 6, 7]], logits)
    memory.calibration.restore(("suffix", 0, 2), 10.0, 7.0)
    memory.calibration.restore(("draft", 1, 9), 4.0, 3.0)
    return memory


def test_round_trip_keeps_table_and_calibration():
    memory = learned_memory()
    tensors, meta = encode(memory, "heads/a")
    table, calibration = decode(tensors, meta, VOCAB, "heads/a")
    assert table.snapshot() == memory.recycle.snapshot()  # same entries, same (recency) order
    assert table.get([9, 5, 6, 7]) == memory.recycle.get([9, 5, 6, 7])
    assert calibration.snapshot() == memory.calibration.snapshot()


def test_another_drafters_calibration_is_dropped():
    tensors, meta = encode(learned_memory(), "heads/a")
    _, calibration = decode(tensors, meta, VOCAB, "heads/b")
    assert set(calibration.snapshot()) == {("suffix", 0, 2)}
    _, calibration = decode(tensors, meta, VOCAB, None)
    assert set(calibration.snapshot()) == {("suffix", 0, 2)}


@pytest.mark.parametrize(
    "spoil",
    [
        lambda t, m: m.update(format="something-else"),
        lambda t, m: t.update(recycle_rows=torch.full((3, 8), VOCAB, dtype=torch.int32)),  # beyond the vocab
        lambda t, m: t.update(recycle_keys=t["recycle_keys"][:1]),  # keys and rows disagree
        lambda t, m: m.update(calibration=json.dumps([["bogus", 0, 0, 1.0, 1.0]])),
        lambda t, m: m.update(calibration=json.dumps([["suffix", 0, 0, 1.0, 2.0]])),  # more hits than tests
    ],
)
def test_malformed_contents_are_refused(spoil):
    tensors, meta = encode(learned_memory(), None)
    spoil(tensors, meta)
    with pytest.raises((ValueError, KeyError)):
        decode(tensors, meta, VOCAB, None)


def test_save_is_private_and_atomic_and_load_restores(tmp_path):
    path = tmp_path / "cache" / "memory" / "model.safetensors"
    memory = learned_memory()
    MemoryFile(path, VOCAB).save(memory)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # n-grams of the user's text
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    loaded = MemoryFile(path, VOCAB).load()
    assert loaded.recycle.snapshot() == memory.recycle.snapshot()
    assert loaded.calibration.snapshot() == memory.calibration.snapshot()


def test_no_file_is_a_cold_start(tmp_path):
    memory = MemoryFile(tmp_path / "none.safetensors", VOCAB).load()
    assert len(memory.recycle) == 0 and memory.calibration.snapshot() == {}


@pytest.mark.parametrize("contents", [b"", b"not a safetensors file", None])
def test_an_unreadable_file_starts_cold_with_a_warning(tmp_path, caplog, contents):
    path = tmp_path / "m.safetensors"
    if contents is None:  # a valid safetensors file of something else
        save_file({"x": torch.zeros(2)}, path, metadata={"format": FORMAT})
    else:
        path.write_bytes(contents)
    with caplog.at_level(logging.WARNING, logger="splitinfer.memory_file"):
        memory = MemoryFile(path, VOCAB).load()
    assert len(memory.recycle) == 0
    assert "starting cold" in caplog.text


def test_saves_are_spaced_by_the_interval(tmp_path):
    path = tmp_path / "m.safetensors"
    keeper = MemoryFile(path, VOCAB, interval_s=3600)
    keeper.save_if_due(learned_memory())
    assert not path.exists()  # not due yet
    keeper.interval_s = 0
    keeper.save_if_due(learned_memory())
    assert path.exists()


def test_a_save_that_fails_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    with caplog.at_level(logging.WARNING, logger="splitinfer.memory_file"):
        MemoryFile(blocker / "m.safetensors", VOCAB).save(learned_memory())
    assert "not saved" in caplog.text


def test_table_bound_drops_the_least_recently_refreshed():
    table = RecyclingTable(k=2, order=1, max_entries=3)
    logits = torch.eye(4)
    for token in (0, 1, 2):
        table.update([[token]], logits[token : token + 1])
    table.update([[0]], logits[:1])  # refreshed: now the newest
    table.update([[3]], logits[3:4])  # over the bound: 1, the oldest, goes
    assert list(table.snapshot()) == [(2,), (0,), (3,)]
    restored = RecyclingTable(k=2, order=1, max_entries=2)
    restored.restore(table.snapshot())
    assert list(restored.snapshot()) == [(0,), (3,)]  # the newest kept


def test_memory_files_are_per_model(tiny_llama, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in tiny_llama.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    assert path_for(tiny_llama, 6, tmp_path).parent == tmp_path
    assert path_for(tiny_llama, 6, tmp_path).name != path_for(other, 6, tmp_path).name  # another directory name
    assert path_for(tiny_llama, 6, tmp_path) == path_for(tiny_llama, 6, tmp_path)


def test_a_fresh_local_side_resumes_the_memory(default_model, tmp_path):
    """The real thing: a LocalSide that generated and closed leaves a file the next one starts from, and
    output stays the same tokens (the memory only changes which guesses are tried)."""
    from splitinfer.local import LocalSide
    from splitinfer.parts import load_cloud
    from splitinfer.testing import InProcessSpan

    first = LocalSide(default_model, drafter="none", memory_dir=tmp_path)
    span, _, _ = load_cloud(first.model_dir, first.split, "cpu", torch.float32)
    prompt = first.encode("Count from one to twelve in words.")
    pinned = {"max_verify": 16}  # a fixed tree size, so that step counts do not depend on timings
    g1 = first.generate(InProcessSpan(span, torch.float32), prompt, 24, **pinned)
    first.close()
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    second = LocalSide(default_model, drafter="none", memory_dir=tmp_path)
    assert second.memory.recycle.snapshot() == first.memory.recycle.snapshot()
    assert second.memory.calibration.snapshot() == first.memory.calibration.snapshot()
    g2 = second.generate(InProcessSpan(span, torch.float32), prompt, 24, **pinned)
    assert g2.token_ids == g1.token_ids
    assert g2.steps < g1.steps  # the table learned this very text: the fresh side starts warm
    assert LocalSide(default_model, drafter="none").memory_file is None  # no memory_dir: nothing kept


def test_chat_and_serve_take_the_memory_options():
    from splitinfer.commands import chat, serve
    from splitinfer.config import MEMORY_DIR

    for module in (chat, serve):
        args = module.parse_args(["--no-memory"])
        assert args.no_memory and args.memory_dir == MEMORY_DIR
        assert module.parse_args(["--memory-dir", "/x"]).memory_dir == Path("/x")
        assert "0600" in module.build_parser().format_help()
