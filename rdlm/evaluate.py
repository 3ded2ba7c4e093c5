"""`python -m rdlm.evaluate`: a checkpoint's quality at several test-time recurrences.

    python -m rdlm.evaluate --checkpoint DIR [--recurrence 1,4,8,16,32,64] [--text GLOB ...]
        [--choices FILE.jsonl ...] [--answers FILE.jsonl ...] [--criteria entropy-diff,kl] [--out FILE.json]
        [--plot FILE.png] [key=value ...]

- **Perplexity** of held-out text: `--text` files (one document each), else the held-out split of the run's
  own data (`data.*` of its config). All depths share one compile (`num_steps` is traced).
- **Multiple choice** (`--choices`, JSON lines `{"context": str, "choices": [str, ...], "answer": int}`): the
  choice (after `--delimiter`, a space, as lm-eval's `target_delimiter`) with the highest summed
  log-likelihood (`acc`) and per-character log-likelihood (`acc_norm`, as lm-eval), each depth from one compile.
- **Exact match** (`--answers`, JSON lines `{"prompt": str, "answer": str}`): greedy cached generation until
  `--stop` (default a newline) or `--max-new-tokens`; strict: the text before the stop, stripped, equals the
  answer stripped. The cache holds an entry per recurrence step, so each depth compiles its own program.
- **Adaptive exit** (`--criteria`): exact match and mean recurrence steps per generated token with each exit
  criterion (official thresholds), capped at the largest `--recurrence`.

Prints a table per task and writes every figure to `--out` (JSON); `--plot` draws each score against the
recurrence.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.config import Config, ConfigError, DataConfig
from rdlm.data import Batch, eval_batches, load_documents, make_dataset, split_documents
from rdlm.errors import ArgumentParser, RdlmError, cli
from rdlm.inference import generate
from rdlm.inference.cli import load_checkpoint
from rdlm.inference.criteria import CRITERIA
from rdlm.progress import track
from rdlm.scoring import loglikelihoods
from rdlm.tokenizer import Tokenizer, load_tokenizer
from rdlm.train import evaluate as validation_loss

Params = dict[str, Any]
DEFAULT_RECURRENCE = (1, 4, 8, 16, 32, 64)


class EvaluationError(RdlmError):
    """An evaluation input (a file, an item, a flag) is unusable."""


def read_items(path: str | Path, fields: dict[str, type]) -> list[dict[str, Any]]:
    """The JSON lines of `path`, each an object with `fields` of the given types; refuses naming file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise EvaluationError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    items = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationError(f"{path}:{n}: not JSON ({e.msg})") from e
            wrong = [k for k, t in fields.items() if not isinstance(item, dict) or not isinstance(item.get(k), t)
                     or isinstance(item.get(k), bool) and t is not bool]
            if wrong:
                want = ", ".join(f"{k!r} ({t.__name__})" for k, t in fields.items())
                raise EvaluationError(f"{path}:{n}: field {wrong[0]!r} is missing or not a {fields[wrong[0]].__name__}; "
                                      f"each line needs {want}")
            items.append(item | {"line": n})
    if not items:
        raise EvaluationError(f"{path} holds no items")
    return items


def heldout_batches(config: Config, tokenizer: Tokenizer, batches: int, text: Sequence[str] = ()) -> list[Batch]:
    """Up to `batches` packed batches of held-out text: the `text` files (all of them held out), else the
    validation split of `config.data`."""
    tc = config.train
    if text:
        data = DataConfig(source="text", paths=tuple(text), tokenizer=config.data.tokenizer, val_fraction=0)
        docs = load_documents(data)
    else:
        data = config.data
        _, docs = split_documents(load_documents(data), data.val_fraction)
    dataset = make_dataset(docs, tokenizer, data, seq_len=tc.seq_len, per_host_batch=tc.batch_size, train=False)
    return [jax.tree.map(jnp.asarray, b) for b in eval_batches(dataset, batches)]


def perplexity(params: Params, config: Config, batches: list[Batch], recurrences: Sequence[int]) -> dict[int, dict]:
    """{r: {loss, perplexity, tokens}} over `batches` (same batches and initial-state seeds at every depth)."""
    tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    losses = validation_loss(params, batches, tuple(recurrences), config.model)
    return {r: {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens} for r, loss in losses.items()}


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[np.ndarray, np.ndarray]:
    """(context ids with bos, continuation ids) split as lm-eval does: the whole text encoded at once, the
    context's trailing whitespace moved to the continuation, so tokens across the boundary match training."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole, head = tok.encode(stripped + continuation), tok.encode(stripped)
    return whole[:len(head)], whole[len(head):]


def choice_accuracy(params: Params, config: Config, tok: Tokenizer, items: list[dict], recurrences: Sequence[int],
                    batch_size: int, delimiter: str = " ") -> dict[int, dict]:
    """{r: {acc, acc_norm, items}}: the choice of highest summed (`acc`) and per-character (`acc_norm`)
    log-likelihood of `delimiter + choice` after the context (lm-eval's `target_delimiter`, counted in the
    characters); every depth runs the same compiled scoring programs."""
    requests = []
    for item in items:
        where = f"line {item['line']}"
        if not 0 <= item["answer"] < len(item["choices"]):
            raise EvaluationError(f"{where}: answer {item['answer']} is not an index of its "
                                  f"{len(item['choices'])} choices")
        if not all(isinstance(c, str) and c for c in item["choices"]):
            raise EvaluationError(f"{where}: every choice must be a non-empty string, got {item['choices']!r}")
        requests += [encode_pair(tok, item["context"], delimiter + choice) for choice in item["choices"]]
    out = {}
    for r in track(recurrences, "multiple choice"):
        scores = loglikelihoods(params, config.model, requests, num_steps=r, batch_size=batch_size)[0]
        acc = norm = at = 0
        for item in items:
            ll = scores[at:at + len(item["choices"])]
            chars = np.array([len(delimiter + c) for c in item["choices"]])
            acc += int(np.argmax(ll) == item["answer"])
            norm += int(np.argmax(ll / chars) == item["answer"])
            at += len(item["choices"])
        out[r] = {"acc": acc / len(items), "acc_norm": norm / len(items), "items": len(items)}
    return out


def _completions(params: Params, config: Config, tok: Tokenizer, prompts: list[list[int]], num_steps: int,
                 max_new_tokens: int, batch_size: int, exit_criterion: str | None = None
                 ) -> tuple[list[str], float]:
    """Greedy completions of `prompts` and the mean recurrence steps per generated token."""
    texts, steps, tokens = [], 0, 0
    for at in range(0, len(prompts), batch_size):
        out = generate(params, prompts[at:at + batch_size], config.model, max_new_tokens=max_new_tokens,
                       num_steps=num_steps, exit_criterion=exit_criterion, stop_ids=tok.stop_ids)
        for row, n in zip(out.tokens, out.lengths):
            ids = [int(t) for t in row[:n] if int(t) not in tok.stop_ids]
            texts.append(tok.decode(ids))
        steps += int(out.steps.sum())
        tokens += int(out.lengths.sum())
    return texts, steps / max(tokens, 1)


def _matches(texts: list[str], items: list[dict], stop: str) -> float:
    """Strict exact match: the text before the first `stop`, stripped, equals the answer stripped."""
    return sum(t.split(stop)[0].strip() == item["answer"].strip() for t, item in zip(texts, items)) / len(items)


def exact_match(params: Params, config: Config, tok: Tokenizer, items: list[dict], recurrences: Sequence[int],
                max_new_tokens: int, batch_size: int, stop: str, criteria: Sequence[str] = ()) -> dict[str, dict]:
    """{"r=R": {exact_match, steps_per_token}} per depth and {"CRITERION": ...} per exit criterion (capped at
    the largest depth)."""
    prompts = [tok.encode(item["prompt"]) for item in items]
    runs = [(f"r={r}", r, None) for r in recurrences] + [(c, max(recurrences), c) for c in criteria]
    out = {}
    for name, r, criterion in track(runs, "exact match"):
        texts, steps = _completions(params, config, tok, prompts, r, max_new_tokens, batch_size, criterion)
        out[name] = {"exact_match": _matches(texts, items, stop), "steps_per_token": steps, "items": len(items),
                     "num_steps": r, "exit_criterion": criterion, "example": texts[0]}
    return out


def plot(results: dict[str, dict], path: Path, mean_recurrence: int) -> None:
    """Each task's score against the recurrence (log2 axis), the training mean marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    for task, rows in results.items():
        depth = {int(k.removeprefix("r=")) if isinstance(k, str) else k: v for k, v in rows.items()
                 if not isinstance(k, str) or k.startswith("r=")}
        metric = next(m for m in ("exact_match", "acc", "loss") if m in next(iter(depth.values())))
        ax.plot(list(depth), [v[metric] for v in depth.values()], marker="o", label=f"{task} ({metric})")
    ax.axvline(mean_recurrence, color="gray", linestyle="--", linewidth=1, label=f"training mean ({mean_recurrence})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test-time recurrence (core iterations)")
    ax.set_ylabel("score (metric in the legend)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def parse_recurrences(text: str) -> tuple[int, ...]:
    """`--recurrence 1,2,4` -> (1, 2, 4); each a count >= 1."""
    try:
        values = tuple(int(r) for r in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ConfigError(f"--recurrence {text!r}: expected comma-separated integers >= 1, e.g. 1,4,8,16")
    return values


def _criteria(text: str) -> tuple[str, ...]:
    names = tuple(c for c in text.split(",") if c)
    bad = [c for c in names if c not in CRITERIA or c == "none"]
    if bad:
        raise ConfigError(f"--criteria: unknown exit criterion {bad[0]!r}; valid: "
                          f"{', '.join(c for c in CRITERIA if c != 'none')}")
    return names


def _table(task: str, rows: dict) -> str:
    """A Markdown table of one task's rows."""
    keys = [k for k in next(iter(rows.values())) if k not in ("example", "exit_criterion", "items", "tokens")]
    lines = [f"| {task} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m rdlm.evaluate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.dtype=bfloat16")
    parser.add_argument("--checkpoint", required=True, help="rdlm checkpoint, training run folder or HF directory")
    parser.add_argument("--recurrence", default=",".join(map(str, DEFAULT_RECURRENCE)))
    parser.add_argument("--text", action="append", default=[], help="held-out text files (glob; repeatable)")
    parser.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    parser.add_argument("--batches", type=int, default=16, help="held-out batches for perplexity")
    parser.add_argument("--choices", action="append", default=[], help="multiple-choice JSON lines (repeatable)")
    parser.add_argument("--delimiter", default=" ", help="between context and choice (lm-eval's target_delimiter)")
    parser.add_argument("--answers", action="append", default=[], help="prompt/answer JSON lines (repeatable)")
    parser.add_argument("--criteria", default="", help="exit criteria for adaptive exit, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--stop", default="\n", help="the answer ends before this text")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: from --checkpoint)")
    parser.add_argument("--out", default=None, help="write every figure here (JSON)")
    parser.add_argument("--plot", default=None, help="draw the scores against the recurrence (PNG)")
    args = parser.parse_args(argv)
    recurrences, criteria = parse_recurrences(args.recurrence), _criteria(args.criteria)
    for flag, value, low in (("--batches", args.batches, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ConfigError(f"{flag} {value} must be at least {low}")
    if not args.stop:
        raise ConfigError("--stop '' is empty; give the text that ends an answer (default: a newline)")
    if criteria and not args.answers:
        raise ConfigError("--criteria needs --answers: adaptive exit is scored by exact match of generated answers")
    names = [Path(p).stem for p in args.choices + args.answers]
    clash = sorted({n for n in names if names.count(n) > 1 or n == "perplexity"})
    if clash:
        raise ConfigError(f"task name {clash[0]!r} (a file's name without its folder and suffix) is used twice; "
                          "rename a file: results are keyed by it")
    choice_sets = {Path(p).stem: read_items(p, {"context": str, "choices": list, "answer": int}) for p in args.choices}
    answer_sets = {Path(p).stem: read_items(p, {"prompt": str, "answer": str}) for p in args.answers}
    if not (args.no_perplexity or args.text or (Path(args.checkpoint) / "checkpoints").is_dir()):
        raise ConfigError(f"{args.checkpoint} is not a training run, so it has no held-out split of its own data: "
                          "give --text FILES for perplexity, or --no-perplexity")

    config, params = load_checkpoint(args.checkpoint, args.overrides)
    tok = load_tokenizer(args.checkpoint, path=args.tokenizer, model_vocab_size=config.model.vocab_size,
                         fallback=config.data.tokenizer or None)
    results: dict[str, dict] = {}
    if not args.no_perplexity:
        batches = heldout_batches(config, tok, args.batches, args.text)
        results["perplexity"] = perplexity(params, config, batches, recurrences)
    for name, items in choice_sets.items():
        results[name] = choice_accuracy(params, config, tok, items, recurrences, args.batch_size, args.delimiter)
    for name, items in answer_sets.items():
        results[name] = exact_match(params, config, tok, items, recurrences, args.max_new_tokens, args.batch_size,
                                    args.stop, criteria)
    for task, rows in results.items():
        print(_table(task, rows) + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        data = args.text or f"held-out split of data.source={config.data.source} {list(config.data.paths)}"
        Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint), "perplexity_data": data,
                                              "results": results}, indent=1))
        print(f"wrote {args.out}")
    if args.plot:
        plot(results, Path(args.plot), config.model.mean_recurrence)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
