"""rdlm: recurrent-depth language models (Huginn) in JAX."""

import warnings

# `python -m rdlm.generate` runs a module this package has already imported (for `rdlm.generate`, the
# function); runpy's warning about that is expected and harmless here.
warnings.filterwarnings("ignore", message="'rdlm.generate' found in sys.modules", category=RuntimeWarning)

from rdlm.checkpoint import CheckpointError, load_model  # noqa: E402
from rdlm.config import Config, ConfigError, ModelConfig, load_config  # noqa: E402
from rdlm.generate import Generation, GenerateError, generate  # noqa: E402
from rdlm.hf import load_hf_checkpoint  # noqa: E402
from rdlm.model import Huginn, forward, params_of  # noqa: E402
from rdlm.params import init_params, logical_axes, param_specs  # noqa: E402

__all__ = ["CheckpointError", "Config", "ConfigError", "GenerateError", "Generation", "Huginn", "ModelConfig", "forward",
           "generate", "init_params", "load_config", "load_hf_checkpoint", "load_model", "logical_axes", "param_specs",
           "params_of"]
