"""Model zoo: Qwen2.5-VL (and text-only Qwen2 via `ModelConfig.vision = None`)."""
from cpt_jax.models.qwen2_5_vl.config import ModelConfig, TextConfig, VisionConfig
from cpt_jax.models.qwen2_5_vl.model import Qwen2_5_VL, init_from_config, prepare_inputs
from cpt_jax.models.qwen2_5_vl.params import load_hf_state, load_pretrained, save_pretrained
from cpt_jax.models.qwen2_5_vl.rope import get_rope_index
from cpt_jax.models.qwen2_5_vl.text import KVCache
from cpt_jax.models.qwen2_5_vl.vision import prepare_vision_inputs

__all__ = [
    "KVCache", "ModelConfig", "Qwen2_5_VL", "TextConfig", "VisionConfig", "get_rope_index",
    "init_from_config", "load_hf_state", "load_pretrained", "prepare_inputs",
    "prepare_vision_inputs", "save_pretrained",
]
