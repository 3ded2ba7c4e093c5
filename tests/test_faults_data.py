"""Fault catalogue of the data and tokenizer inputs: bad data files and data config (through
`load_documents`, `make_dataset` and tools/train_tokenizer.py), and bad tokenizer files (through
`load_tokenizer`). Each case checks the error names the file, key or value and the fix, and that
nothing on disk changed."""

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from conftest import FIXTURES, REPO
from faultlib import fails_in_process, snapshot
from rdlm.config import ConfigError, DataConfig
from rdlm.data import load_documents, make_dataset
from rdlm.tokenizer import HFTokenizer, load_tokenizer

HF_DIR = FIXTURES / "hf_tokenizer"


def load_tool(name: str):
    """tools/NAME.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, content: str | bytes) -> str:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def array_record(path: Path, records: list[bytes]) -> str:
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    return str(path)


def text_cfg(*paths: str, source: str = "text", **kw) -> DataConfig:
    return DataConfig(source=source, paths=paths, **kw)


# ---- data files -> load_documents ------------------------------------------------------------------
# Each case writes its files under `d` and returns (config, the needles the message must hold).
DATA_CASES: dict[str, Callable[[Path], tuple[DataConfig, list[str]]]] = {
    "one document, held out": lambda d: (
        text_cfg(write(d / "one.txt", "To be, or not to be.")),
        ["training split is empty", "holds only 1 document", "one.txt", "data.source=text",
         "data.val_fraction=0.05", "set data.val_fraction=0"]),
    "empty file, val_fraction=0": lambda d: (
        text_cfg(write(d / "empty.txt", ""), val_fraction=0.0),
        ["all 1 documents are empty", "empty.txt", "bos/eos"]),
    "empty file, default val_fraction": lambda d: (
        text_cfg(write(d / "empty.txt", "")), ["documents are empty", "empty.txt"]),
    "only blank documents": lambda d: (
        text_cfg(write(d / "a.txt", "\n\n"), write(d / "b.txt", "  "), val_fraction=0.0),
        ["all 2 documents are empty", "a.txt", "b.txt"]),
    "empty jsonl": lambda d: (
        text_cfg(write(d / "none.jsonl", "\n"), source="jsonl"), ["holds no documents", "none.jsonl"]),
    "jsonl of empty texts": lambda d: (
        text_cfg(write(d / "e.jsonl", '{"text": ""}\n{"text": ""}\n'), source="jsonl", val_fraction=0.0),
        ["all 2 documents are empty", "e.jsonl"]),
    "binary text file": lambda d: (
        text_cfg(write(d / "ok.txt", "fine"), write(d / "blob.txt", b"ok\xff\xfe\x00")),
        ["blob.txt: not UTF-8 text (byte 0xff at offset 2)", "data.source=text"]),
    "binary jsonl file": lambda d: (
        text_cfg(write(d / "blob.jsonl", b"\x89PNG\r\n"), source="jsonl"), ["blob.jsonl: not UTF-8 text"]),
    "jsonl line without the key": lambda d: (
        text_cfg(write(d / "bad.jsonl", '{"text": "ok"}\n{"body": "x"}\n'), source="jsonl"),
        ["bad.jsonl:2: not a JSON object with a 'text' field"]),
    "jsonl value not a string": lambda d: (
        text_cfg(write(d / "num.jsonl", '{"text": "ok"}\n\n{"text": 3}\n'), source="jsonl"),
        ["num.jsonl:3: field 'text' is a int, not a string"]),
    "jsonl line a list": lambda d: (
        text_cfg(write(d / "list.jsonl", '["text"]\n'), source="jsonl"), ["list.jsonl:1: not a JSON object"]),
    "text file as array_record": lambda d: (
        text_cfg(write(d / "docs.txt", "plain text\n"), source="array_record"),
        ["docs.txt: not an ArrayRecord file", "ArrayRecordWriter"]),
    "array_record record not UTF-8": lambda d: (
        text_cfg(array_record(d / "bad.ar", [b"fine", b"\xc3\x28"]), source="array_record"),
        ["bad.ar: record 1 is not UTF-8 text (byte 0xc3 at offset 0)"]),
    "array_record without records": lambda d: (
        text_cfg(array_record(d / "none.ar", []), source="array_record"), ["holds no documents", "none.ar"]),
    "glob matches a directory": lambda d: (
        (d / "sub").mkdir() or text_cfg(write(d / "a.txt", "text"), str(d / "*")),
        ["matches the directory", "sub", "data.source=text reads files"]),
    "broken link": lambda d: (
        os.symlink(d / "gone.txt", d / "link.txt") or text_cfg(write(d / "a.txt", "text"), str(d / "*.txt")),
        ["link.txt: cannot read (No such file or directory)", "data.paths="]),
    "pattern matches nothing": lambda d: (text_cfg(str(d / "*.none")), ["matches no file", "*.none"]),
    "no paths": lambda d: (text_cfg(), ["data.paths is empty", "data.source=text"]),
}


@pytest.mark.parametrize("case", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_bad_data_is_named(case, tmp_path):
    cfg, needles = case(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_documents(cfg)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_data_file_is_named(tmp_path):
    path = write(tmp_path / "secret.txt", "text")
    os.chmod(path, 0)
    with pytest.raises(ConfigError, match=r"secret.txt: cannot read \(Permission denied\)"):
        load_documents(text_cfg(path, str(tmp_path / "*.txt")))


@pytest.mark.parametrize("train, needles", [
    (True, ["no documents for the training split of data.source=text", "add documents"]),
    (False, ["no documents for the validation split", "data.val_fraction=0.0", "set data.val_fraction above 0"]),
])
def test_empty_split_names_the_split(train, needles):
    with pytest.raises(ConfigError) as err:
        make_dataset([], HFTokenizer(HF_DIR), text_cfg("a.txt", val_fraction=0.0), seq_len=8, per_host_batch=1,
                     train=train)
    for needle in needles:
        assert needle in str(err.value)


# ---- data and vocab size -> tools/train_tokenizer.py -----------------------------------------------
# (files to write {name: content}, overrides, --vocab-size, needles); paths are relative to the test's folder.
TOKENIZER_CASES = {
    "one document, held out": ({"one.txt": "To be."}, ["data.paths=[{d}/one.txt]"], 300,
                               ["training split is empty", "one.txt", "data.val_fraction=0"]),
    "one short document": ({"one.txt": "To be or not to be, that is the question."},
                           ["data.paths=[{d}/one.txt]", "data.val_fraction=0"], 400,
                           ["too little text for 400 pieces: the text of 1 document supports at most 324"]),
    "vocab below the characters": ({"one.txt": "To be or not to be, that is the question."},
                                   ["data.paths=[{d}/one.txt]", "data.val_fraction=0"], 261,
                                   ["vocab size 261 is too small for the text of 1 document",
                                    "needs at least 276 pieces"]),
    "blank documents": ({"a.txt": "\n", "b.txt": "\n \n"}, ["data.paths=[{d}/*.txt]", "data.val_fraction=0"], 300,
                        ["all 2 documents are empty", "a.txt"]),
    "binary file": ({"a.txt": "text", "b.txt": b"\xff"}, ["data.paths=[{d}/*.txt]"], 300,
                    ["b.txt: not UTF-8 text"]),
    "array_record of text": ({"a.txt": "text"}, ["data.source=array_record", "data.paths=[{d}/a.txt]"], 300,
                             ["a.txt: not an ArrayRecord file"]),
}


@pytest.mark.parametrize("files, overrides, vocab, needles", TOKENIZER_CASES.values(), ids=TOKENIZER_CASES.keys())
def test_train_tokenizer_on_bad_data(files, overrides, vocab, needles, tmp_path, capsys):
    for name, content in files.items():
        write(tmp_path / name, content)
    overrides = ["model.vocab_size=512", "data.source=text"] + [o.format(d=tmp_path) for o in overrides]
    fails_in_process(load_tool("train_tokenizer").main,
                     ["tiny", *overrides, "--vocab-size", str(vocab), "--out", str(tmp_path / "tok" / "sp")], capsys,
                     *needles, keep=(tmp_path,))
    assert not (tmp_path / "tok").exists()


# ---- tokenizer files -> load_tokenizer -------------------------------------------------------------
def hf_copy(d: Path, **config) -> Path:
    """The HF fixture copied to d/hf, with `config` merged into its tokenizer_config.json."""
    shutil.copytree(HF_DIR, d / "hf")
    path = d / "hf" / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return d / "hf"


# Each case prepares files under `d` and returns (load_tokenizer keyword arguments, needles).
TOKENIZER_FILE_CASES: dict[str, Callable[[Path], tuple[dict, list[str]]]] = {
    "missing path": lambda d: (dict(path=d / "nowhere.model"),
                               ["tokenizer path=", "nowhere.model' is not a file", "train_tokenizer.py"]),
    "directory with neither file": lambda d: (dict(path=d), ["is a directory with neither tokenizer.json nor "
                                                             "tokenizer.model"]),
    "corrupt .model": lambda d: (dict(path=write(d / "bad.model", b"\x00garbage")),
                                 ["bad.model: cannot read a sentencepiece model"]),
    "empty .model": lambda d: (dict(path=write(d / "empty.model", b"")),
                               ["empty.model: cannot read a sentencepiece model"]),
    "corrupt tokenizer.json": lambda d: (dict(path=write(d / "tokenizer.json", "{not json")),
                                         ["tokenizer.json: cannot load an HF tokenizer"]),
    "binary as tokenizer.json": lambda d: (dict(path=write(d / "tok.json", b"\x00\xff" * 8)),
                                           ["tok.json: cannot load an HF tokenizer"]),
    "tokenizer.json without a vocabulary": lambda d: (
        dict(path=write(d / "tokenizer.json", json.dumps({"version": "1.0", "model": {
            "type": "WordLevel", "vocab": {}, "unk_token": "[UNK]"}}))),
        ["tokenizer.json: the tokenizer has an empty vocabulary"]),
    "tokenizer_config.json not JSON": lambda d: (
        dict(path=write(hf_copy(d) / "tokenizer_config.json", "{oops") and d / "hf"),
        ["tokenizer_config.json: not valid JSON"]),
    "too many ids for the model": lambda d: (dict(path=HF_DIR, model_vocab_size=100),
                                             ["has 256 token ids", "model.vocab_size=100"]),
    "chat template does not compile": lambda d: (dict(path=hf_copy(d, chat_template="{% for %}")),
                                                 ["tokenizer_config.json: chat_template does not compile"]),
    "chat_template.jinja not UTF-8": lambda d: (
        dict(path=write(hf_copy(d) / "chat_template.jinja", b"{{ \xff }}") and d / "hf"),
        ["chat_template.jinja: not UTF-8 text"]),
    "no tokenizer for a checkpoint": lambda d: (dict(checkpoint_dir=d),
                                                ["no tokenizer found", f"in {d}", "pass --tokenizer PATH"]),
}


@pytest.mark.parametrize("case", TOKENIZER_FILE_CASES.values(), ids=TOKENIZER_FILE_CASES.keys())
def test_bad_tokenizer_files_are_named(case, tmp_path):
    kwargs, needles = case(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_tokenizer(**{"checkpoint_dir": None, "model_vocab_size": 512} | kwargs)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert snapshot(tmp_path) == before
