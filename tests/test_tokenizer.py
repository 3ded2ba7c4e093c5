"""Tokenizers: both kinds behind one interface, HF chat templates, choosing a tokenizer for a checkpoint."""

import json
import shutil

import numpy as np
import pytest

from rdlm.config import ConfigError
from rdlm.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from conftest import FIXTURES

HF_DIR = FIXTURES / "hf_tokenizer"
TEXT = "To be, or not to be: that is the question.\n\tWhether 'tis nobler {in the mind} ~ 42%"
CHAT = [{"role": "system", "content": "You are a helpful assistant.\n"},
        {"role": "user", "content": "  What do you think of Hamlet?"}]
RENDERED = ("<|begin_text|><|begin_header|>system<|end_header|>\n\nYou are a helpful assistant.<|end_turn|>"
            "<|begin_header|>user<|end_header|>\n\nWhat do you think of Hamlet?<|end_turn|>"
            "<|begin_header|>Huginn<|end_header|>\n\n")


@pytest.fixture(scope="module")
def hf():
    return HFTokenizer(HF_DIR)


@pytest.fixture(scope="module")
def sp(tokenizer_path):
    return SentencePieceTokenizer(tokenizer_path)


@pytest.fixture
def hf_copy(tmp_path):
    """A writable copy of the HF fixture and its tokenizer_config.json contents."""
    shutil.copytree(HF_DIR, tmp_path / "hf")
    return tmp_path / "hf", json.loads((HF_DIR / "tokenizer_config.json").read_text())


def test_hf_special_ids_and_stop_ids(hf):
    ids = {t: hf.token_id(t) for t in ("<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>",
                                       "<|end_turn|>", "<|pad|>")}
    assert None not in ids.values() and len(set(ids.values())) == 6
    assert (hf.bos, hf.eos, hf.pad) == (ids["<|begin_text|>"], ids["<|end_text|>"], ids["<|pad|>"])
    assert hf.stop_ids == (ids["<|end_text|>"], ids["<|end_turn|>"], ids["<|begin_text|>"])  # eos first, no repeat
    assert hf.vocab_size == 256 and hf.token_id("<|no_such|>") is None


def test_hf_round_trip(hf):
    ids = hf.encode(TEXT)
    assert ids.dtype == np.int32 and ids[0] == hf.bos and hf.bos not in ids[1:] and hf.eos not in ids
    assert hf.decode(ids) == "<|begin_text|>" + TEXT  # special tokens stay visible by default
    assert hf.decode(ids, skip_special=True) == hf.decode(ids[1:]) == TEXT
    assert hf.encode(TEXT, eos=True)[-1] == hf.eos
    np.testing.assert_array_equal(hf.encode(TEXT, bos=False), ids[1:])
    assert list(hf.encode("a<|end_turn|>b", bos=False)) == [*hf.encode("a", bos=False), hf.token_id("<|end_turn|>"),
                                                            *hf.encode("b", bos=False)]


def test_sp_round_trip_and_ids(sp):
    ids = sp.encode(TEXT)
    assert ids.dtype == np.int32 and ids[0] == sp.bos and sp.eos not in ids
    assert sp.decode(ids[1:]) == TEXT  # the newline and tab by byte fallback
    assert sp.decode(sp.encode(TEXT, eos=True)) == "<s>" + TEXT + "</s>"  # control pieces written out
    assert sp.decode(sp.encode(TEXT, eos=True), skip_special=True) == TEXT
    assert (sp.pad, sp.bos, sp.eos, sp.vocab_size) == (0, 2, 3, 512)
    assert sp.stop_ids == (sp.eos,) and sp.token_id("<|end_turn|>") is None and sp.token_id("</s>") == sp.eos
    assert sp.chat_template is None
    # a model's padded embedding rows past the vocabulary can be generated: they read as unk
    assert sp.decode([*sp.encode("ab")[1:], sp.vocab_size, 10**6]) == sp.decode([*sp.encode("ab")[1:], 1, 1])
    with pytest.raises(ConfigError, match=r"sp.model has no chat template .*format the prompt yourself"):
        sp.apply_chat_template(CHAT)


def test_chat_template_renders_the_huginn_format(hf):
    assert hf.apply_chat_template(CHAT) == RENDERED
    assert hf.apply_chat_template(CHAT, add_generation_prompt=False) == RENDERED.removesuffix(
        "<|begin_header|>Huginn<|end_header|>\n\n")
    reply = CHAT + [{"role": "assistant", "content": " To be. "}]  # inside {% generation %}
    assert hf.apply_chat_template(reply, add_generation_prompt=False).endswith(
        "<|begin_header|>assistant<|end_header|>\n\nTo be.<|end_turn|>")


def test_encoded_chat_has_one_bos(hf):
    ids = hf.encode_chat(CHAT)
    assert ids[0] == hf.bos and list(ids).count(hf.bos) == 1
    assert hf.decode(ids) == RENDERED
    np.testing.assert_array_equal(ids, hf.encode(RENDERED, bos=False))
    assert hf.tok.encode(RENDERED).ids[:2] == [hf.bos, hf.bos]  # the fixture's post-processor, had we let it run
    assert list(ids).count(hf.token_id("<|end_turn|>")) == 2 and ids[-1] != hf.eos


def test_hf_config_variants(hf_copy):
    d, config = hf_copy
    template = "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}{{ eos_token }}{{ pad_token }}"
    config |= {"bos_token": {"content": "<|begin_text|>", "lstrip": False}, "pad_token": None,
               "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer(d / "tokenizer.json")
    assert tok.pad is None and tok.bos == tok.token_id("<|begin_text|>")
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == (
        '<|begin_text|>{"role": "user", "content": "é"}<|end_text|>')
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|end_turn|>", "eos_token": "<|end_turn|>"}))
    tok = HFTokenizer(d)  # the map wins over tokenizer_config.json
    assert tok.pad == tok.eos == tok.token_id("<|end_turn|>")
    assert tok.stop_ids == (tok.eos, tok.token_id("<|end_text|>"), tok.bos)
    (d / "chat_template.jinja").write_text("{% if messages|length > 1 %}{{ raise_exception('one message only') }}"
                                           "{% endif %}{{ messages[0]['content'] }}")
    tok = HFTokenizer(d)
    assert tok.apply_chat_template(CHAT[:1]) == CHAT[0]["content"]
    with pytest.raises(ConfigError, match=r"chat template of .*tokenizer.json: one message only"):
        tok.apply_chat_template(CHAT)


@pytest.mark.parametrize("edit, message", [
    ({"chat_template": [{"name": "tool_use", "template": "x"}]},
     r"chat_template lists \['tool_use'\] but no 'default'"),
    ({"chat_template": "{% for %}"}, r"tokenizer_config.json: chat_template does not compile"),
    ({"chat_template": 3}, r"chat_template must be a string or a list"),
    ({"bos_token": None}, r"tokenizer_config.json: bos_token and eos_token are needed"),
    ({"eos_token": "<|eot|>"}, r"eos_token='<\|eot\|>' is not in the vocabulary of .*tokenizer.json"),
    ({"pad_token": 7}, r"pad_token=7 is neither a string nor"),
])
def test_hf_config_errors_are_named(hf_copy, edit, message):
    d, config = hf_copy
    (d / "tokenizer_config.json").write_text(json.dumps(config | edit))
    with pytest.raises(ConfigError, match=message):
        HFTokenizer(d)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match=r"tokenizer.json: cannot load an HF tokenizer"):
        load_tokenizer(tmp_path, model_vocab_size=256)
    with pytest.raises(ConfigError, match=r"bad.model: cannot read a sentencepiece model"):
        load_tokenizer(None, path=tmp_path / "bad.model", model_vocab_size=256)
    shutil.copy(HF_DIR / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"tokenizer_config.json: expected a JSON object"):
        load_tokenizer(tmp_path, model_vocab_size=256)


def test_load_tokenizer_picks_by_what_is_there(tmp_path, tokenizer_path):
    hf_dir, sp_dir, both, empty = (tmp_path / n for n in ("hf", "sp", "both", "empty"))
    shutil.copytree(HF_DIR, hf_dir)
    shutil.copytree(HF_DIR, both)
    for d in (sp_dir, both):
        d.mkdir(exist_ok=True)
        shutil.copy(tokenizer_path, d / "tokenizer.model")
    empty.mkdir()
    kind = lambda *a, **k: type(load_tokenizer(*a, model_vocab_size=512, **k))  # noqa: E731
    assert kind(hf_dir) is HFTokenizer and kind(sp_dir) is SentencePieceTokenizer and kind(both) is HFTokenizer
    assert kind(both, path=tokenizer_path) is SentencePieceTokenizer  # an explicit path wins
    assert kind(sp_dir, path=hf_dir / "tokenizer.json") is HFTokenizer
    assert kind(sp_dir, path=hf_dir) is HFTokenizer and kind(empty, path=sp_dir) is SentencePieceTokenizer
    assert kind(empty, fallback=tokenizer_path) is SentencePieceTokenizer  # data.tokenizer when nothing else
    assert kind(hf_dir, fallback=tokenizer_path) is HFTokenizer
    assert kind(None, fallback=hf_dir / "tokenizer.json") is HFTokenizer
    assert load_tokenizer(hf_dir, model_vocab_size=512).source == hf_dir / "tokenizer.json"


def test_load_tokenizer_errors_say_what_was_looked_for(tmp_path, tokenizer_path):
    with pytest.raises(ConfigError) as err:
        load_tokenizer(tmp_path, model_vocab_size=512, fallback="")
    msg = str(err.value)
    assert f"looked for tokenizer.json or tokenizer.model in {tmp_path}, then data.tokenizer (not set)" in msg
    assert "tools/train_tokenizer.py" in msg and "pass --tokenizer PATH" in msg
    with pytest.raises(ConfigError, match=r"^no tokenizer found: looked for data.tokenizer \(not set\)"):
        load_tokenizer(None, model_vocab_size=512)
    with pytest.raises(ConfigError, match=r"tokenizer path='.*nowhere.model' is not a file"):
        load_tokenizer(tmp_path, path=tmp_path / "nowhere.model", model_vocab_size=512)
    with pytest.raises(ConfigError, match=r"data.tokenizer='.*nowhere.model' is not a file; .*train_tokenizer.py"):
        load_tokenizer(tmp_path, fallback=str(tmp_path / "nowhere.model"), model_vocab_size=512)
    with pytest.raises(ConfigError, match=r"tokenizer path='.*' is a directory with neither tokenizer.json nor"):
        load_tokenizer(None, path=tmp_path, model_vocab_size=512)


def test_vocab_larger_than_the_model_is_an_error(tokenizer_path):
    with pytest.raises(ConfigError, match=r"tokenizer .*hf_tokenizer/tokenizer.json has 256 token ids but the model "
                                          r"has model.vocab_size=200 embedding rows"):
        load_tokenizer(HF_DIR, model_vocab_size=200)
    with pytest.raises(ConfigError, match=r"tokenizer .*sp.model has 512 token ids but the model has "
                                          r"model.vocab_size=256"):
        load_tokenizer(None, fallback=tokenizer_path, model_vocab_size=256)
    assert load_tokenizer(HF_DIR, model_vocab_size=256).vocab_size == 256
    assert issubclass(ConfigError, ValueError)


def test_train_tokenizer_refuses_what_sentencepiece_cannot_train(tmp_path):
    """Checked before sentencepiece runs (it would stop in an internal check); nothing is written."""
    from rdlm.tokenizer import train_tokenizer

    with pytest.raises(ConfigError, match=r"vocab size 100 is below 260 \(256 byte pieces \+ pad, unk, bos, eos\)"):
        train_tokenizer(["To be."], tmp_path / "sp", 100)
    with pytest.raises(ConfigError, match=r"no text to train a tokenizer on: 2 documents, none with a non-blank line"):
        train_tokenizer(["\n", " "], tmp_path / "sp", 300)
    assert not list(tmp_path.iterdir())
