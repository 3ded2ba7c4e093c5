"""lm-eval (EleutherAI's evaluation harness, 0.4.x) model `rdlm`, registered when this module is imported.

    python -m rdlm.harness run --model rdlm --model_args checkpoint=ckpt/huginn-0125,num_steps=32 \\
        --tasks arc_easy,gsm8k --batch_size 8 [--apply_chat_template --system_instruction "..."]

Model args (`--model_args k=v,...` or `simple_evaluate(model="rdlm", model_args={...})`): `checkpoint` (an
rdlm checkpoint, training run folder or HF huginn directory, as `python -m rdlm.inference` takes),
`num_steps` (recurrences per token; default the checkpoint's `model.mean_recurrence`), `exit_criterion`
and `exit_threshold` (per-token exits in `generate_until`, as `rdlm.generate`; scoring requests are then
refused: a scoring pass has no per-token exit), `batch_size` (wins over lm-eval's `--batch_size`, which is 1 unless given: pass one of them), `dtype` (`float32` or `bfloat16`, the compute dtype; default the checkpoint's),
`tokenizer` (default: the checkpoint's), `init_scale` (initial latent noise, 0: zeros), `seed`,
`max_gen_toks` (default for tasks that set none). lm-eval's `--device` is ignored: JAX runs on its
default backend (`JAX_PLATFORMS` chooses).

Text is encoded with bos first (as training documents), unless it already starts with bos (a chat
template writes it); empty contexts and perplexity windows are conditioned on bos. Scoring is
`rdlm.scoring`; generation is `rdlm.generate`, greedy unless the task says `do_sample`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import sys
from typing import Any

import jax

try:  # lm-eval's own models first: registering ours before them would hide them
    importlib.import_module("lm_eval.models")
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"rdlm.harness needs lm-eval, the `eval` extra: pip install 'rdlm[eval]' ({e})") from e
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from rdlm.config import ConfigError
from rdlm.errors import RdlmError, cli
from rdlm.inference import CRITERIA, generate, load_checkpoint
from rdlm.inference.checks import MAX_STEPS, check_range
from rdlm.scoring import bucket, loglikelihoods, rolling_loglikelihood
from rdlm.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
# gen_kwargs of lm-eval tasks that generation honours (others are refused, not silently ignored)
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "min_p")


class HarnessError(RdlmError, ValueError):
    """A model arg or task setting rdlm cannot honour; the message names it."""


def cut_at_stops(text: str, until: list[str]) -> str:
    """`text` up to the first of the `until` strings, as lm-eval's HF model cuts its generations."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


@register_model("rdlm")
class RdlmLM(TemplateLM):
    """An rdlm checkpoint as an lm-eval model: `loglikelihood`, `loglikelihood_rolling`, `generate_until`,
    and the chat hooks `apply_chat_template` / `tokenizer_name` through the tokenizer's chat template."""

    def __init__(self, checkpoint: str, num_steps: int | None = None, exit_criterion: str | None = None,
                 exit_threshold: float | None = None, batch_size: int | str = 8, dtype: str | None = None,
                 tokenizer: str | None = None, init_scale: float = 1.0, seed: int = 0, max_gen_toks: int = 256):
        super().__init__()
        exit_criterion = None if exit_criterion == "none" else exit_criterion
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise HarnessError(f"batch_size={batch_size!r} must be a positive integer (rdlm has no automatic "
                               "batch size)")
        if exit_criterion is not None and exit_criterion not in CRITERIA:
            raise HarnessError(f"unknown exit_criterion={exit_criterion!r}; valid: {', '.join(CRITERIA)}")
        if exit_threshold is not None:
            if exit_criterion is None:
                raise HarnessError("exit_threshold was given without an exit_criterion")
            crit = CRITERIA[exit_criterion]
            check_range(f"exit_threshold for {exit_criterion}", exit_threshold, *crit.valid, low_open=True,
                        integer=crit.counting)
        if num_steps is not None:
            check_range("num_steps", num_steps, 1, MAX_STEPS, integer=True)
        check_range("init_scale", init_scale, 0.0, 1e6)
        check_range("seed", seed, -2**63, 2**63 - 1, integer=True)
        check_range("max_gen_toks", max_gen_toks, 1, math.inf, integer=True)
        overrides = [] if dtype in (None, "auto") else [f"model.dtype={dtype}"]
        self.config, self.params = load_checkpoint(checkpoint, overrides)
        cfg = self.config.model
        self.num_steps = int(cfg.mean_recurrence if num_steps is None else num_steps)
        self.tokenizer = load_tokenizer(checkpoint, path=tokenizer, model_vocab_size=cfg.vocab_size,
                                        fallback=self.config.data.tokenizer or None)
        self.exit_criterion, self.exit_threshold = exit_criterion, exit_threshold
        self.batch_size, self.init_scale, self.max_gen_toks = batch_size, float(init_scale), int(max_gen_toks)
        self.rng = jax.random.key(seed)
        self._generate_calls = 0  # folded into the rng: each generation batch draws its own noise and samples
        log.info("rdlm: %s, num_steps=%d, exit_criterion=%s, batch_size=%d, dtype=%s, on JAX's %s backend",
                 checkpoint, self.num_steps, exit_criterion, batch_size, cfg.dtype, jax.default_backend())

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
                            ) -> RdlmLM:
        """The model from its args; of lm-eval's `additional_config` only `--batch_size` (default 1) is taken,
        where the model args set none (`--device` and `--max_batch_size` mean nothing to JAX)."""
        valid = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(arg_dict) - valid)
        if unknown:
            raise HarnessError(f"unknown model args {unknown}; valid: {', '.join(sorted(valid))}")
        batch_size = (additional_config or {}).get("batch_size")
        return cls(**(({} if batch_size is None else {"batch_size": batch_size}) | dict(arg_dict)))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> RdlmLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- tokens ----------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos

    @property
    def prefix_token_id(self) -> int:
        """What empty contexts and perplexity windows are conditioned on: bos, as training documents start."""
        return self.tokenizer.bos

    @property
    def max_length(self) -> int:
        return self.config.model.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """ids of `string`; bos first when `add_special_tokens`, or (None) unless the text starts with bos."""
        ids = self.tokenizer.encode(string, bos=False).tolist()
        bos = (not ids or ids[0] != self.tokenizer.bos) if add_special_tokens is None else add_special_tokens
        return [self.tokenizer.bos] * bos + ids

    # ---- chat ------------------------------------------------------------------------------------

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.source).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template when one is asked for (`--apply_chat_template`); a tokenizer without
        one is refused here, before any request is built."""
        if not chat_template:
            return None
        if self.tokenizer.chat_template is None:
            raise ConfigError(f"--apply_chat_template: tokenizer {self.tokenizer.source} has no chat template "
                              "(sentencepiece models have none); run without it")
        return self.tokenizer.chat_template

    # ---- scoring ---------------------------------------------------------------------------------

    def _fixed_depth(self, request_type: str) -> None:
        if self.exit_criterion is not None:
            raise HarnessError(
                f"{request_type} requests with exit_criterion={self.exit_criterion}: rdlm's exits are per token "
                "while decoding (generate_until); a scoring pass runs all positions at once, where an exit would "
                "be one per sequence, not per token. Score at a fixed depth: drop exit_criterion (num_steps sets "
                "it), or evaluate generation tasks only")

    def _scoring(self) -> dict[str, Any]:
        return dict(num_steps=self.num_steps, batch_size=self.batch_size, init_scale=self.init_scale, rng=self.rng)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        self._fixed_depth("loglikelihood")
        with tqdm(total=len(requests), desc="rdlm loglikelihood", disable=disable_tqdm) as bar:
            logprobs, greedy = loglikelihoods(self.params, self.config, [(c, x) for _, c, x in requests],
                                              progress=bar.update, **self._scoring())
        results = [(float(p), bool(g)) for p, g in zip(logprobs, greedy)]
        for (pair, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        self._fixed_depth("loglikelihood_rolling")
        docs = [self.tok_encode(req.args[0], add_special_tokens=False) for req in requests]
        with tqdm(desc="rdlm loglikelihood_rolling windows", disable=disable_tqdm) as bar:
            results = rolling_loglikelihood(self.params, self.config, docs, self.prefix_token_id,
                                            progress=bar.update, **self._scoring()).tolist()
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, result)
        return results

    # ---- generation ------------------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
        """(stop strings, max new tokens, rdlm.generate's sampling keywords) of a task's gen_kwargs."""
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise HarnessError(f"gen_kwargs {unknown} are not supported by rdlm; supported: {', '.join(GEN_KWARGS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        if max_new > self.config.model.block_size - 1:
            log.warning("max_gen_toks=%d exceeds block_size - 1; generating %d tokens", max_new,
                        self.config.model.block_size - 1)
            max_new = self.config.model.block_size - 1
        sampling = {}
        if gen_kwargs.get("do_sample"):  # greedy otherwise, whatever the temperature (as HF transformers)
            sampling = dict(temperature=float(gen_kwargs.get("temperature") or 1.0),
                            top_k=int(gen_kwargs.get("top_k") or 0), top_p=float(gen_kwargs.get("top_p", 1.0)),
                            min_p=float(gen_kwargs.get("min_p", 0.0)))
        return until, max_new, sampling

    def _generate(self, prompts: list[list[int]], max_new: int, sampling: dict[str, Any]
                  ) -> tuple[list[list[int]], int, int]:
        """(the generated ids of each prompt without the stop token; the tokens generated, stop tokens
        included, and the recurrences they took), in one `rdlm.generate` call of a bucketed row count."""
        n_rows = bucket(len(prompts), 1, self.batch_size)
        self._generate_calls += 1
        out = generate(self.params, prompts + [prompts[0]] * (n_rows - len(prompts)), self.config,
                       max_new_tokens=max_new, num_steps=self.num_steps, init_scale=self.init_scale,
                       exit_criterion=self.exit_criterion, exit_threshold=self.exit_threshold,
                       stop_ids=self.tokenizer.stop_ids, rng=jax.random.fold_in(self.rng, self._generate_calls),
                       **sampling)
        generated = []
        for r in range(len(prompts)):
            ids = out.tokens[r, :out.lengths[r]].tolist()
            if ids and ids[-1] in self.tokenizer.stop_ids:
                ids.pop()
            generated.append(ids)
        return generated, int(out.lengths[:len(prompts)].sum()), int(out.steps[:len(prompts)].sum())

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Generate per request until a stop token, an `until` string (the text is cut before it) or
        `max_gen_toks`; requests with the same gen_kwargs run in batches, longest prompt first."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results = [""] * len(requests)
        tokens = steps = 0
        with tqdm(total=len(requests), desc="rdlm generate_until", disable=disable_tqdm) as bar:
            for indices in groups.values():
                until, max_new, sampling = self._generation_settings(requests[indices[0]].args[1])
                room = self.config.model.block_size - max_new  # the prompt keeps its last `room` tokens
                prompts = {i: self.tok_encode(requests[i].args[0])[-room:] for i in indices}
                order = sorted(indices, key=lambda i: -len(prompts[i]))
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    generated, n_tokens, n_steps = self._generate([prompts[i] for i in chunk], max_new, sampling)
                    for i, ids in zip(chunk, generated):
                        results[i] = cut_at_stops(self.tokenizer.decode(ids, skip_special=True), until)
                        self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                    tokens, steps = tokens + n_tokens, steps + n_steps
                    bar.update(len(chunk))
        log.info("rdlm generate_until: %d tokens, %.2f recurrence steps per token (num_steps=%d, exit_criterion=%s)",
                 tokens, steps / max(tokens, 1), self.num_steps, self.exit_criterion)
        return results


@cli
def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line (`lm_eval.__main__.cli_evaluate`: `run`, `ls`, `validate`, or the legacy flags)
    with `--model rdlm` registered; an rdlm error prints as one `error:` line."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


__all__ = ["GEN_KWARGS", "HarnessError", "RdlmLM", "cut_at_stops", "main"]
