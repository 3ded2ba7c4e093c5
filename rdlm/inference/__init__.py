"""Cached generation for Huginn: prefill and decode in one compiled program, with per-token exits.

- `criteria`: the official exit criteria (`CRITERIA`), run after every recurrence, per row.
- `cache`: the static-shape `KVCache`, the official lookup strategies (`STRATEGIES`), `cache_bytes`,
  and the cached token mixer the model's blocks take.
- `sampling`: greedy, or temperature -> top-k -> top-p -> min-p as the official.
- `engine`: the forward over new tokens, prefill and the decode loops (named loop state, a hashable `Spec`).
- `checks`, `memory`: argument checks and the will-it-fit estimate, before anything compiles.
- `api`: `generate`; `cli`: `python -m rdlm.inference` and `load_checkpoint` (any checkpoint format).
"""

from rdlm.inference.api import generate
from rdlm.inference.cache import STRATEGIES, KVCache, cache_bytes, cache_slots, init_cache
from rdlm.inference.checks import GenerateError
from rdlm.inference.cli import load_checkpoint
from rdlm.inference.criteria import CRITERIA
from rdlm.inference.engine import Generation, Spec
from rdlm.inference.sampling import Sampling, sample_token

__all__ = ["CRITERIA", "STRATEGIES", "GenerateError", "Generation", "KVCache", "Sampling", "Spec", "cache_bytes",
           "cache_slots", "generate", "init_cache", "load_checkpoint", "sample_token"]
