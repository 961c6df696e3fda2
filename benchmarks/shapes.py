"""The text-only model shapes and rollout workload of the peer benchmarks
(../shared/peers/_common.py SIZES), shared by the benchmarks that compare with them or break
them down: q/k/v bias, RMSNorm eps 1e-6, untied LM head."""
from __future__ import annotations

from cpt_jax.models import ModelConfig, TextConfig

SIZES = {
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4,
                  num_heads=8, num_kv_heads=2),
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                 num_heads=12, num_kv_heads=2),
}
# Rollouts: rows, prompt tokens and new tokens of a generate call.
BATCH, PROMPT_LEN, NEW_TOKENS = 8, 64, 64


def text_config(size: str) -> ModelConfig:
  shape = SIZES[size]
  head_dim = shape["hidden_size"] // shape["num_heads"]
  # Text-only: the three M-RoPE rows are equal, so any section split is plain RoPE.
  text = TextConfig(rope_theta=1e6, rms_norm_eps=1e-6, mrope_section=(head_dim // 2, 0, 0),
                    **shape)
  return ModelConfig(text=text, vision=None, tie_word_embeddings=False).validate()


def layer_matmuls(config: ModelConfig) -> list[tuple[int, int]]:
  """[in, out] of each weight matmul of one decoder layer as the model runs them (q/k/v and
  gate/up stacked into one matmul each): q/k/v, o, gate/up, down."""
  t = config.text
  head_dim = t.hidden_size // t.num_heads
  return [(t.hidden_size, (t.num_heads + 2 * t.num_kv_heads) * head_dim),
          (t.num_heads * head_dim, t.hidden_size),
          (t.hidden_size, 2 * t.intermediate_size),
          (t.intermediate_size, t.hidden_size)]
