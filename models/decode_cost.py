"""What a training decode keeps for backward, and whether to checkpoint it.

See docs/model.md, 'Decode cost'.

Shape legend:
    B   cells        G   decoded genes        E   decoder width        F   SwiGLU hidden width
    H   cross-attention heads                  M   latent tokens

Every (cell, gene) row of the gene-query block keeps its activations until backward: the
residual stream and its LayerNorm (about 6 E values), the SwiGLU's two projections, gate and
product (4 F), the attention output and statistics (H values per query), and a dozen fp32 values
of the NB likelihood. ``tests/test_decode_cost.py`` checks this count against the tensors autograd
actually saves.
"""

from __future__ import annotations

from typing import Literal

from atlasldm.models.layers import swiglu_hidden_dim

Normaliser = Literal["estimated", "exact"]
SWITCH_WORDS = {"true": "true", "false": "false", "auto": "auto"}
LIKELIHOOD_FP32_VALUES = 12  # logits, log μ, θ terms, lgamma inputs: fp32 whatever the autocast


def normalise_switch(value: object) -> str:
    """A checkpoint_decode value from YAML, the command line or Python -> "auto"|"true"|"false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return SWITCH_WORDS.get(str(value).strip().lower(), str(value))


def decode_activation_bytes(
    embed_dim: int, cross_heads: int, multiple_of: int, rows: int, half_precision: bool
) -> float:
    """Bytes a decode of `rows` (cell, gene) rows keeps for backward without checkpointing."""
    width = swiglu_hidden_dim(embed_dim, multiple_of)
    per_row_16 = 6 * embed_dim + 4 * width + 2 * cross_heads  # matmul outputs: autocast dtype
    act_bytes = 2 if half_precision else 4
    return rows * (per_row_16 * act_bytes + LIKELIHOOD_FP32_VALUES * 4)


def should_checkpoint(switch: str, activation_bytes: float, budget_mb: float) -> bool:
    """Checkpoint when told to, or ("auto") when the kept activations exceed the budget."""
    if switch != "auto":
        return switch == "true"
    return activation_bytes > budget_mb * 2**20
