"""Make the tiny HF tokenizer fixture (tests/fixtures/hf_tokenizer/): huginn-0125's layout in small.

    python tools/make_hf_tokenizer.py [--out tests/fixtures/hf_tokenizer]

A byte-level BPE of 256 ids (the tiny parity models' vocab_size), trained with the `tokenizers`
library on the first 20,000 characters of Hamlet (the bundled `shakespeare` corpus). Its alphabet is the
printable ASCII characters (and those of the text), so printable ASCII text round-trips. It has huginn's
special tokens, with <|begin_text|> as bos and <|end_text|> as eos, and a post-processor that puts bos first
when special tokens are added (so a tokenizer that forgets `add_special_tokens=False` shows a second
bos). `tokenizer_config.json` holds a chat template, written here, that renders huginn-0125's chat
format; assistant content is wrapped in `{% generation %}` as HF training templates do.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rdlm.data import shakespeare_files  # noqa: E402
from rdlm.errors import ArgumentParser, cli  # noqa: E402

SPECIAL = ["<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|begin_header|>' + message['role'] + '<|end_header|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|end_turn|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] | trim + '<|end_turn|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|begin_header|>Huginn<|end_header|>\n\n' }}{% endif %}"
)


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=Path(__file__).name, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests/fixtures/hf_tokenizer"))
    args = parser.parse_args(argv)
    text = next(f for f in shakespeare_files() if f.name == "hamlet_gut.txt").read_text(encoding="utf-8")[:20_000]

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = byte_level, decoders.ByteLevel()
    alphabet = "".join(piece for piece, _ in pre_tokenizers.ByteLevel(use_regex=False).pre_tokenize_str(
        string.printable))  # the byte-level characters of printable ASCII
    tok.train_from_iterator(text.splitlines(keepends=True), trainers.BpeTrainer(
        vocab_size=256, special_tokens=SPECIAL, initial_alphabet=list(alphabet), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_text|> $A",
                                                       special_tokens=[("<|begin_text|>", tok.token_to_id(SPECIAL[0]))])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_text|>",
              "eos_token": "<|end_text|>", "pad_token": "<|pad|>",
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out}/tokenizer.json ({tok.get_vocab_size()} ids) and tokenizer_config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
