"""Models: one decoder Transformer with LM and scalar heads, and Hugging Face import/export."""
from rlhf_jax.models.heads import last_token_index, last_token_values, lm_params_to_scalar
from rlhf_jax.models.transformer import (
    ModelOutput,
    Transformer,
    TransformerConfig,
    default_position_ids,
    init_params,
    param_logical_axes,
)
from rlhf_jax.models.hf import from_pretrained, save_pretrained
