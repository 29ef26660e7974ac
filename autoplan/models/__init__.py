"""Reference models (GPT, Llama, MoE), named configurations and the loader for a user's model.py."""

from autoplan.models.configs import NAMED_CONFIGS, build_named, named_config
from autoplan.models.loader import LoadedModel, load_model
from autoplan.models.transformer import Transformer, TransformerConfig, gpt, llama, moe

__all__ = ["NAMED_CONFIGS", "LoadedModel", "Transformer", "TransformerConfig", "build_named", "gpt", "llama",
           "load_model", "moe", "named_config"]
