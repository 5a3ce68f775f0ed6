"""`make test-big`: the seed's 7B shape on this machine, in bfloat16 (2 to 5 minutes and 17 GB on 2 cores).

Not part of `make test` (marked `big`): the split's greedy tokens equal the unsplit model's, with weights
drawn from a seed (the real ones cannot be downloaded here), and each side holds the weights it should.
Prints the memory table that benchmarks/big_models.py records.
"""

from __future__ import annotations

import pytest

from splitinfer.experiments.big import measure


@pytest.mark.big
def test_the_7b_split_equals_the_unsplit_model(tmp_path):
    r = measure("mistral-7b", tmp_path, seed=0, dtype="bfloat16", threads=2, tokens=8)
    gb = 1e9
    print(f"\n7B bfloat16: local weights {r['weights_bytes']['local'] / gb:.2f} GB (peak {r['local']['VmHWM'] / gb:.2f}), "
          f"cloud weights {r['weights_bytes']['cloud'] / gb:.2f} GB (peak {r['cloud']['VmHWM'] / gb:.2f}), "
          f"unsplit peak {r['reference']['VmHWM'] / gb:.2f} GB; tokens {r['local']['tokens']}")
    assert r["reference"]["tokens"] == r["local"]["tokens"]
    assert r["split_equals_unsplit"] is True
    # Each side holds its share of a 7.25B-parameter model, and no more than its share plus the runtime.
    assert abs(r["weights_bytes"]["whole"] / 2 - 7.25e9) < 0.01e9
    assert r["local"]["weights_bytes"] == r["weights_bytes"]["local"]
    assert r["local"]["VmHWM"] < r["weights_bytes"]["local"] + 2e9
    assert r["cloud"]["VmHWM"] < r["weights_bytes"]["cloud"] + 2e9
