"""Model FLOPs of Huginn, for throughput and MFU figures.

Convention (PaLM, MaxText): 2 FLOPs per multiply-add of every matmul, attention counted without the
causal discount. A forward pass at recurrence r runs the prelude and coda once and the adapter and
core block r times.
"""

from rdlm.config import ModelConfig


def block_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """One SandwichBlock: qkv, output projection, gated MLP, and the two attention matmuls."""
    e, i = cfg.n_embd, cfg.intermediate_size
    return 2 * (3 * e * e + e * e + 2 * e * i + i * e) + 4 * seq * e


def forward_flops_per_token(cfg: ModelConfig, num_steps: int, seq: int) -> float:
    """Forward FLOPs per token at `num_steps` recurrences (embedding lookup is free)."""
    fixed = (cfg.n_layers_in_prelude + cfg.n_layers_in_coda) * block_flops_per_token(cfg, seq)
    step = cfg.n_layers_in_recurrent_block * block_flops_per_token(cfg, seq) + 2 * 2 * cfg.n_embd * cfg.n_embd
    return fixed + num_steps * step + 2 * cfg.n_embd * cfg.vocab_size
