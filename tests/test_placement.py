"""--device-map: the cloud's layers over several devices with accelerate's maps (placement logic on a CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from splitinfer.cloud import batch
from splitinfer.cloud.cache import SessionCache
from splitinfer.cloud.placement import devices, place, resolve
from splitinfer.config import Split
from splitinfer.models import ModelError
from splitinfer.parts import load_cloud
from splitinfer.random_model import LIKE
from splitinfer import hf, masks

GIB = 2**30


def meta_layers(like: str, indices: range) -> dict[int, torch.nn.Module]:
    with torch.device("meta"):
        layer = hf.layer_classes(AutoConfig.for_model(**LIKE[like]))[0]
        config = AutoConfig.for_model(**LIKE[like])
        return {i: layer(config, layer_idx=i) for i in indices}


def test_auto_fills_devices_in_order_and_balanced_shares_them():
    """The 7B cloud span (layers 2..29, 436 MB each in bfloat16) over two 40 GiB GPUs, and over two 8 GiB ones."""
    layers = meta_layers("mistral-7b", range(2, 30))
    two_big = {0: 40 * GIB, 1: 40 * GIB, "cpu": 64 * GIB}
    auto = resolve("auto", layers, torch.bfloat16, two_big)
    assert set(auto.values()) == {"cuda:0"}  # it all fits on the first
    balanced = resolve("balanced", layers, torch.bfloat16, two_big)
    on0 = [i for i, d in balanced.items() if d == "cuda:0"]
    assert on0 == list(range(2, 2 + len(on0))) and 12 <= len(on0) <= 16  # a contiguous half, give or take
    assert devices(balanced) == ["cuda:0", "cuda:1"]
    small = resolve("auto", layers, torch.bfloat16, {0: 8 * GIB, 1: 8 * GIB, "cpu": 64 * GIB})
    counts = {d: list(small.values()).count(d) for d in devices(small)}
    assert counts["cuda:0"] == 18 and sum(counts.values()) == 28  # 8 GiB / 436 MB per layer, then the next
    assert all(small[i] <= small[i + 1] for i in range(2, 29))  # in layer order, never interleaved


def test_a_map_file_in_accelerates_format(tmp_path):
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"model.layers": 1, "model.layers.2": 0, "model.layers.3": "cpu"}))
    layers = dict.fromkeys(range(2, 6), torch.nn.Identity())
    assert resolve(str(f), layers, torch.float32) == {2: "cuda:0", 3: "cpu", 4: "cuda:1", 5: "cuda:1"}
    assert place({"": "cpu"}, [2, 3], "x") == {2: "cpu", 3: "cpu"}  # accelerate's whole-model key
    # "model.layers.1" names layer 1, not layers 10..19.
    with pytest.raises(ModelError, match=r"no device for cloud layer\(s\) \[10, 11\]"):
        place({"model.layers.1": 0}, [1, 10, 11], "--device-map m.json")
    for bad, message in ((["cpu"], "object"), ({"model.layers": "disk"}, "disk"), ({"model.layers": "gpu7"}, "not a torch device")):
        f.write_text(json.dumps(bad))
        with pytest.raises(ModelError, match=message):
            resolve(str(f), layers, torch.float32)
    with pytest.raises(ModelError, match="not auto, balanced or a readable JSON file"):
        resolve(str(tmp_path / "missing.json"), layers, torch.float32)


def test_a_span_placed_by_a_map_over_several_entries_computes_the_same(tiny_llama, tmp_path):
    """On a CPU every entry is the CPU, but the code path is the device map's: per-layer placement, the pass
    following the layers, each session's cache on its layer's device; the replies equal the unplaced span's."""
    split = Split(6)
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"model.layers.2": "cpu", "model.layers.3": "cpu", "model": "cpu"}))
    plain, config, _ = load_cloud(tiny_llama, split, "cpu", torch.float32)
    placed, placed_config, _ = load_cloud(tiny_llama, split, "cpu", torch.float32, device_map=str(f))
    batch.use_batching(config)
    batch.use_batching(placed_config)
    assert placed.devices == [torch.device("cpu")] * 2
    rotary = hf.rotary_for(config)
    outs = []
    for span in (plain, placed):
        cache = SessionCache(span.indices, 64, span.devices)
        hidden = torch.randn(1, 5, config.hidden_size, generator=torch.Generator().manual_seed(1))
        cos, sin = hf.rope(rotary, masks.positions(0, masks.chain(5)), torch.float32)
        mask = masks.additive(masks.full_mask(0, masks.causal(5)), torch.float32)
        outs.append(batch.run(span, [batch.Rows(cache, 0, hidden, cos, sin, mask)])[0])
        assert cache.length == 5 and {k.device for k in cache.keys} == {torch.device("cpu")}
    assert torch.equal(outs[0], outs[1])


def test_the_cache_keeps_each_layer_on_its_device():
    cache = SessionCache([2, 3], 512, [torch.device("cpu"), torch.device("meta")])
    keys = torch.zeros(1, 2, 3, 4)
    cache.ensure(3, keys)
    assert [k.device.type for k in cache.keys] == ["cpu", "meta"] and [v.device.type for v in cache.values] == ["cpu", "meta"]


@pytest.mark.slow
def test_a_cloud_process_started_with_a_device_map_serves_the_same_tokens(tmp_path, default_model):
    from conftest import hf_greedy

    from splitinfer.local import LocalSide
    from splitinfer.procs import cloud_process
    from splitinfer.remote import cloud_session, ws_url

    f = tmp_path / "map.json"
    f.write_text(json.dumps({"model.layers.2": "cpu", "model.layers": "cpu"}))
    local = LocalSide(default_model, drafter="none")
    ids = local.encode("Name three colours.")
    with cloud_process(default_model, extra=["--device-map", str(f), "--threads", "1"]) as (url, _):
        with cloud_session(ws_url(url), expected=local.identity) as span:
            got = local.generate(span, ids, 16, "sequential").token_ids
    assert got == hf_greedy(default_model, ids, 16, eos=2)
