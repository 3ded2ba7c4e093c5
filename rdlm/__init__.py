"""rdlm: recurrent-depth language models (Huginn) in JAX."""

from rdlm.checkpoint import CheckpointError, load_model
from rdlm.config import Config, ConfigError, ModelConfig, load_config
from rdlm.hf import load_hf_checkpoint
from rdlm.inference import Generation, GenerateError, generate
from rdlm.model import Huginn, StepLatents, forward, params_of
from rdlm.params import init_params, logical_axes, param_specs

__all__ = ["CheckpointError", "Config", "ConfigError", "GenerateError", "Generation", "Huginn", "ModelConfig",
           "StepLatents", "forward", "generate", "init_params", "load_config", "load_hf_checkpoint", "load_model",
           "logical_axes", "param_specs", "params_of"]
