"""Tokenizers: our sentencepiece models (training and inference) and HF `tokenizer.json` files (huginn-0125).

Both kinds share one interface (`Tokenizer`): `vocab_size`, `bos`, `eos`, `pad`, `stop_ids`,
`encode(text, bos=True, eos=False)`, `decode(ids)`, `chat_template`, `apply_chat_template(messages)` and
`encode_chat(messages)`. `load_tokenizer` picks the kind from what a checkpoint directory or path holds.

    tok = load_tokenizer("ckpt/huginn-0125", model_vocab_size=65536)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])   # the template writes bos itself
    text = tok.decode(ids)                                        # special tokens stay visible
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import sentencepiece as spm
import tokenizers

from rdlm.config import ConfigError

HF_FILE, SP_FILE = "tokenizer.json", "tokenizer.model"
HF_CONFIG_FILE, HF_SPECIAL_FILE = "tokenizer_config.json", "special_tokens_map.json"
HF_TEMPLATE_FILE = "chat_template.jinja"
# What the converter copies from an HF checkpoint directory (those present).
TOKENIZER_FILES = (HF_FILE, HF_CONFIG_FILE, HF_SPECIAL_FILE, HF_TEMPLATE_FILE, SP_FILE)
# Tokens that end generation besides eos, when the vocabulary has them (the official huginn generate
# stops on <|begin_text|>, <|end_text|> and <|end_turn|>).
STOP_TOKENS = ("<|end_text|>", "<|end_turn|>", "<|begin_text|>")


class Tokenizer:
    """The interface both kinds implement.

    vocab_size: number of ids, added and special tokens included (at most the model's vocab_size).
    bos, eos: ids; pad: id or None. stop_ids: eos, then those of STOP_TOKENS the vocabulary has.
    chat_template: the jinja source, or None (sentencepiece models have none).
    """

    source: Path  # the file it was read from, for messages
    vocab_size: int
    bos: int
    eos: int
    pad: int | None
    stop_ids: tuple[int, ...]
    chat_template: str | None = None
    _template: jinja2.Template | None = None
    _special_tokens: dict[str, str]  # bos_token, eos_token, pad_token: the template's variables (set with _template)

    def _token_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_id(self, token: str) -> int | None:
        """The id of a token (a piece or special token), or None when the vocabulary has no such token."""
        raise NotImplementedError

    def decode(self, ids: Any, *, skip_special: bool = False) -> str:
        """Text of `ids`. Special tokens (bos, eos, <|end_turn|>, ...) are written out as their text unless
        `skip_special`, so that a decoded chat shows its structure."""
        raise NotImplementedError

    def _set_stop_ids(self) -> None:
        found = (self.token_id(t) for t in STOP_TOKENS)
        self.stop_ids = tuple(dict.fromkeys([self.eos, *(i for i in found if i is not None)]))

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> np.ndarray:
        """int32 ids of `text`, with bos first and eos last when asked. Training documents use
        `eos=True`; a prompt uses the default; text a chat template rendered (it holds bos already) uses
        `bos=False`, as `encode_chat` does."""
        return np.asarray([self.bos] * bos + self._token_ids(text) + [self.eos] * eos, np.int32)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation `messages` ([{"role": ..., "content": ...}, ...]) rendered by the chat
        template as HF transformers renders it; with `add_generation_prompt`, ending with the header of
        the assistant's turn."""
        if self._template is None:
            raise ConfigError(f"tokenizer {self.source} has no chat template (sentencepiece models have none; HF "
                              f"tokenizers keep it in {HF_CONFIG_FILE} `chat_template` or {HF_TEMPLATE_FILE}); "
                              "format the prompt yourself and use encode()")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special_tokens)
        except jinja2.TemplateError as e:
            raise ConfigError(f"chat template of {self.source}: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> np.ndarray:
        """ids of the rendered conversation; no bos is added, the template writes its own (as HF's
        `apply_chat_template(tokenize=True)`)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), bos=False)


# ---- sentencepiece --------------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (tools/train_tokenizer.py trains one); needs bos and eos pieces."""

    def __init__(self, path: str | os.PathLike):
        self.source = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{path}: cannot read a sentencepiece model ({e})") from e
        self.vocab_size = self.sp.get_piece_size()
        self.bos, self.eos = self.sp.bos_id(), self.sp.eos_id()
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        if min(self.bos, self.eos) < 0:
            raise ConfigError(f"tokenizer {path} has no bos/eos pieces; train it with tools/train_tokenizer.py")
        self._set_stop_ids()

    def _token_ids(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def token_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def decode(self, ids: Any, *, skip_special: bool = False) -> str:
        # ids past the vocabulary (a model's padded embedding rows can be sampled) read as unk, not an error
        ids = [int(i) if 0 <= int(i) < self.vocab_size else self.sp.unk_id() for i in ids]
        if skip_special:
            return self.sp.decode(ids)
        text, run = [], []  # sentencepiece drops control pieces (bos, eos, pad): write them out between runs
        for i in ids:
            if self.sp.is_control(i):
                text += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(text) + self.sp.decode(run)


# The fewest pieces a model of train_tokenizer can have: 256 byte-fallback pieces and pad, unk, bos, eos
# (sentencepiece adds one piece per distinct character of the text on top).
MIN_SP_VOCAB = 256 + 4


def _documents(n: int) -> str:
    return f"{n} document{'s' if n != 1 else ''}"


def _training_failure(e: RuntimeError, vocab_size: int, docs: int) -> str:
    """sentencepiece's internal check failure, said in terms of the vocab size and the text."""
    text = _documents(docs)
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e)):
        return (f"vocab size {vocab_size} is too small for the text of {text}: it needs at least {m[1]} pieces "
                f"({MIN_SP_VOCAB} byte and special pieces + one per distinct character)")
    if m := re.search(r"value <= (\d+)", str(e)):
        return (f"too little text for {vocab_size} pieces: the text of {text} supports at most {m[1]}; add text "
                "or lower the vocab size")
    return f"too little text for {vocab_size} pieces: {text} (sentencepiece: {e})"


def train_tokenizer(docs: list[str], model_prefix: str | Path, vocab_size: int) -> Path:
    """A sentencepiece BPE model with byte fallback; ids: pad 0, unk 1, bos 2, eos 3. Writes
    MODEL_PREFIX.model and .vocab, only once training succeeded (it runs in a temporary directory).

    Text is kept as is (identity normalisation, whitespace preserved); newlines, never inside a
    training line, are encoded by byte fallback."""
    if vocab_size < MIN_SP_VOCAB:
        raise ConfigError(f"vocab size {vocab_size} is below {MIN_SP_VOCAB} (256 byte pieces + pad, unk, bos, eos)")
    lines = [line for d in docs for line in d.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"no text to train a tokenizer on: {_documents(len(docs))}, none with a non-blank line")
    with tempfile.TemporaryDirectory(prefix="rdlm-tokenizer-") as tmp:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_prefix=f"{tmp}/sp", vocab_size=vocab_size, model_type="bpe",
                byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0, num_threads=2,
                normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
        except RuntimeError as e:  # sentencepiece's internal checks: too little text for vocab_size, ...
            raise ConfigError(_training_failure(e, vocab_size, len(docs))) from e
        Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".model", ".vocab"):
            shutil.move(f"{tmp}/sp{suffix}", f"{model_prefix}{suffix}")
    return Path(f"{model_prefix}.model")


# ---- HF tokenizer.json ----------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: HF marks assistant text with it (for training masks);
    rendering keeps the body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[Any]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _compile_chat_template(source: str, where: Path) -> jinja2.Template:
    """A chat template compiled in the environment HF transformers uses (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{where}: chat_template does not compile: {e} (template line {e.lineno})") from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


class HFTokenizer(Tokenizer):
    """An HF `tokenizer.json` with the `tokenizer_config.json` (special tokens, `chat_template`) and
    `special_tokens_map.json` beside it; the map's entries win, as in HF transformers, and
    `chat_template.jinja`, when present, is the template."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.source = path / HF_FILE if path.is_dir() else path
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(self.source))
        except Exception as e:  # tokenizers raises plain Exception for unreadable or malformed files
            raise ConfigError(f"{self.source}: cannot load an HF tokenizer ({e})") from e
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        if not self.vocab_size:
            raise ConfigError(f"{self.source}: the tokenizer has an empty vocabulary")
        config_file = self.source.parent / HF_CONFIG_FILE
        config = _read_json(config_file)
        specials = config | _read_json(self.source.parent / HF_SPECIAL_FILE)
        ids = {key: self._special_id(specials, key) for key in ("bos_token", "eos_token", "pad_token")}
        if ids["bos_token"] is None or ids["eos_token"] is None:
            raise ConfigError(f"{config_file}: bos_token and eos_token are needed (set them there or in "
                              f"{HF_SPECIAL_FILE})")
        self.bos, self.eos, self.pad = ids["bos_token"], ids["eos_token"], ids["pad_token"]
        self._special_tokens = {key: self.tok.id_to_token(i) for key, i in ids.items() if i is not None}
        self._set_stop_ids()
        template_file = self.source.parent / HF_TEMPLATE_FILE
        if template_file.is_file():
            try:
                self.chat_template, where = template_file.read_text(encoding="utf-8"), template_file
            except UnicodeDecodeError as e:
                raise ConfigError(f"{template_file}: not UTF-8 text ({e})") from e
        else:
            self.chat_template, where = self._config_template(config, config_file), config_file
        if self.chat_template is not None:
            self._template = _compile_chat_template(self.chat_template, where)

    def _special_id(self, specials: dict[str, Any], key: str) -> int | None:
        value = specials.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{self.source.parent}: {key}={value!r} is neither a string nor {{\"content\": ...}}")
        i = self.tok.token_to_id(value)
        if i is None:
            raise ConfigError(f"{self.source.parent}: {key}={value!r} is not in the vocabulary of {self.source}")
        return i

    @staticmethod
    def _config_template(config: dict[str, Any], config_file: Path) -> str | None:
        """`chat_template`: a string, or a list of {name, template} of which "default" is used."""
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise ConfigError(f"{config_file}: chat_template lists {sorted(map(str, named))} but no 'default'")
            template = named["default"]
        if template is not None and not isinstance(template, str):
            raise ConfigError(f"{config_file}: chat_template must be a string or a list of {{name, template}}")
        return template

    def _token_ids(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor bos; ours (or the chat template's) is the only one.
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def decode(self, ids: Any, *, skip_special: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


# ---- choosing one ---------------------------------------------------------------------------------


def _open(path: str | os.PathLike, what: str) -> Tokenizer:
    """The tokenizer at `path`: a sentencepiece .model file, a tokenizer.json, or a directory holding one
    of them (tokenizer.json first); `what` names where the path came from, for messages."""
    p = Path(path)
    if p.is_dir():
        if (p / HF_FILE).is_file():
            return HFTokenizer(p)
        if (p / SP_FILE).is_file():
            return SentencePieceTokenizer(p / SP_FILE)
        raise ConfigError(f"{what}={str(p)!r} is a directory with neither {HF_FILE} nor {SP_FILE}")
    if not p.is_file():
        raise ConfigError(f"{what}={str(p)!r} is not a file; pass a sentencepiece .model file "
                          f"(tools/train_tokenizer.py trains one), an HF {HF_FILE} or a directory holding one")
    return HFTokenizer(p) if p.suffix == ".json" else SentencePieceTokenizer(p)


def load_tokenizer(checkpoint_dir: str | os.PathLike | None, *, path: str | os.PathLike | None = None,
                   model_vocab_size: int, fallback: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer for a model, chosen in this order:

    1. `path` when given: a sentencepiece .model file, an HF tokenizer.json, or a directory holding one;
    2. what `checkpoint_dir` holds: tokenizer.json (HF, with tokenizer_config.json beside it), else
       tokenizer.model (sentencepiece);
    3. `fallback`: the training config's `data.tokenizer` (an empty string counts as unset).

    Raises ConfigError when none is found, or when the tokenizer has more ids than the model's
    `model_vocab_size` embedding rows.
    """
    if path:
        tok = _open(path, "tokenizer path")
    elif checkpoint_dir is not None and any((Path(checkpoint_dir) / f).is_file() for f in (HF_FILE, SP_FILE)):
        tok = _open(checkpoint_dir, "checkpoint directory")
    elif fallback:
        tok = _open(fallback, "data.tokenizer")
    else:
        looked = f"{HF_FILE} or {SP_FILE} in {checkpoint_dir}, then " if checkpoint_dir is not None else ""
        fix = "pass --tokenizer PATH (" if checkpoint_dir is not None else "set data.tokenizer=PATH ("
        raise ConfigError(f"no tokenizer found: looked for {looked}data.tokenizer (not set); {fix}a sentencepiece "
                          f".model file, an HF {HF_FILE} or a directory holding one; tools/train_tokenizer.py trains "
                          "a .model)")
    if tok.vocab_size > model_vocab_size:
        raise ConfigError(f"tokenizer {tok.source} has {tok.vocab_size} token ids but the model has "
                          f"model.vocab_size={model_vocab_size} embedding rows")
    return tok
