"""Chunk KV store: tiers, write-behind, integrity checks. Synthetic tensors, no model."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ragserve.engines.local.kv_store import ChunkKV, KVSpec, KVStore, segment_key


def make_spec(**overrides) -> KVSpec:
    fields = dict(model_id="toy-0123456789ab", dtype=torch.bfloat16, num_layers=3, num_kv_heads=2, head_dim=8)
    fields.update(overrides)
    return KVSpec(**fields)


def make_kv(num_tokens: int, seed: int = 0, spec: KVSpec | None = None) -> ChunkKV:
    spec = spec or make_spec()
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, spec.num_kv_heads, num_tokens, spec.head_dim)
    return ChunkKV(torch.randn(shape, generator=g).to(spec.dtype), torch.randn(shape, generator=g).to(spec.dtype))


def make_store(tmp_path: Path, **kwargs) -> KVStore:
    return KVStore(tmp_path, kwargs.pop("spec", make_spec()), **kwargs)


def assert_same(a: ChunkKV, b: ChunkKV) -> None:
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert a.keys.dtype == b.keys.dtype


def test_segment_key_depends_on_model_context_and_tokens():
    base = segment_key("m", (1,), (5, 6, 7))
    assert base == segment_key("m", (1,), (5, 6, 7))
    assert len({base, segment_key("m2", (1,), (5, 6, 7)), segment_key("m", (), (5, 6, 7)),
                segment_key("m", (1,), (5, 6)), segment_key("m", (), (1, 5, 6, 7))}) == 5


def test_disk_round_trip_is_bit_exact(tmp_path):
    store = make_store(tmp_path)
    kv = make_kv(7)
    store.put("ab" * 32, kv)
    store.flush()                                  # write-behind: wait for the file
    assert store.path("ab" * 32).is_file()
    store.drop_ram()
    got, source = store.lookup("ab" * 32, num_tokens=7)
    assert source == "disk"
    assert_same(got, kv)
    assert store.lookup("ab" * 32)[1] == "ram"     # promoted
    store.close()


def test_lru_evicts_by_bytes_and_restores_from_disk(tmp_path):
    kvs = [make_kv(4, seed=i) for i in range(3)]
    store = make_store(tmp_path, ram_budget_bytes=2 * kvs[0].nbytes)
    keys = [f"{i:02d}" * 32 for i in range(3)]
    for key, kv in zip(keys, kvs):
        store.put(key, kv)
    store.flush()
    assert store.ram_bytes == 2 * kvs[0].nbytes
    first, source = store.lookup(keys[0])          # evicted from RAM, restored from disk
    assert source == "disk"
    assert_same(first, kvs[0])
    assert store.lookup(keys[1])[1] == "disk"      # restoring keys[0] evicted keys[1]
    store.close()


def test_missing_entry_is_a_miss(tmp_path):
    store = make_store(tmp_path, write_behind=False)
    assert store.lookup("cd" * 32) == (None, "miss")
    assert store.stats.misses == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_or_truncated_file_is_rejected_and_deleted(tmp_path, caplog, damage):
    store = make_store(tmp_path, write_behind=False)
    key = "ef" * 32
    store.put(key, make_kv(9))
    path = store.path(key)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF                           # inside the tensor bytes: only the checksum sees it
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"\x00" * 3)
    path.write_bytes(bytes(data))
    store.drop_ram()
    with caplog.at_level(logging.WARNING, logger="ragserve.engines.local.kv_store"):
        assert store.lookup(key) == (None, "miss")
    assert "rejecting" in caplog.text
    assert not path.exists()
    assert store.stats.corrupt == 1


def test_entry_of_another_dtype_or_length_is_never_used(tmp_path):
    writer = make_store(tmp_path, write_behind=False)
    key = "12" * 32
    writer.put(key, make_kv(5))
    reader = make_store(tmp_path, write_behind=False, spec=make_spec(dtype=torch.float16))
    assert reader.lookup(key) == (None, "miss")    # same model id, other dtype: stale
    writer.put(key, make_kv(5))
    writer.drop_ram()
    assert writer.lookup(key, num_tokens=6) == (None, "miss")


def test_put_rejects_kv_of_another_shape(tmp_path):
    store = make_store(tmp_path, write_behind=False)
    with pytest.raises(ValueError, match="do not match"):
        store.put("34" * 32, make_kv(3, spec=make_spec(num_layers=4)))
