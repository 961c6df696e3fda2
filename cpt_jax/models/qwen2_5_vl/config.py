"""Qwen2.5-VL architecture configs: presets, validation and HF config.json conversion.

`ModelConfig.vision` is None for a text-only Qwen2 decoder (text benchmarks); everything else
about the decoder is identical, and its M-RoPE reduces to plain RoPE because the three
position rows of text tokens are equal.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ATTENTION_IMPLS = ("xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots")
ACTIVATIONS = ("silu", "gelu")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112  # pixels per side of an attention window
  out_hidden_size: int = 3584  # must equal the text hidden size
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  hidden_act: str = "silu"
  tokens_per_second: int = 2  # video only; kept for config round trips
  rms_norm_eps: float = 1e-6  # fixed in the reference implementation

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened pixel patch (C * T * P * P)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_layers: int = 28
  num_heads: int = 28
  num_kv_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)  # temporal, height, width (head_dim / 2)
  max_position_embeddings: int = 128000
  hidden_act: str = "silu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  vision: VisionConfig | None = dataclasses.field(default_factory=VisionConfig)
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: tuple[int, ...] = (151645,)
  pad_token_id: int | None = None
  tie_word_embeddings: bool = False
  # 'xla': einsum attention (any backend, float32 softmax); 'cudnn': jax.nn.dot_product_attention
  # with implementation='cudnn' (GPU, bf16/fp16 activations).
  attention_impl: str = "xla"
  # Rematerialisation of decoder and vision blocks in training: 'none', 'full' (save nothing),
  # 'dots' (save matmul outputs without batch dims).
  remat: str = "none"
  # Causal attention without a KV cache (training, scoring) in this many query blocks, each
  # attending to the keys up to its own end: (n + 1) / 2n of the full square's work (1: one
  # square; blocks beyond S / 16 queries each are not split off). 'xla' only.
  causal_blocks: int = 8

  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)

  # ---------------------------------------------------------------- validation

  def validate(self) -> ModelConfig:
    """Raises ValueError naming every inconsistency; returns self for chaining."""
    errors = []
    t = self.text
    if t.hidden_size % t.num_heads:
      errors.append(f"text hidden_size {t.hidden_size} is not divisible by num_heads {t.num_heads}")
    elif t.head_dim % 2:
      errors.append(f"text head_dim {t.head_dim} must be even for rotary embeddings")
    elif sum(t.mrope_section) != t.head_dim // 2:
      errors.append(
          f"sum(mrope_section) = sum({list(t.mrope_section)}) = {sum(t.mrope_section)} "
          f"must equal text head_dim / 2 = {t.head_dim // 2}")
    if len(t.mrope_section) != 3:
      errors.append(f"mrope_section must have 3 entries (t, h, w), got {list(t.mrope_section)}")
    if t.num_heads % t.num_kv_heads:
      errors.append(
          f"text num_heads {t.num_heads} is not a multiple of num_kv_heads {t.num_kv_heads}")
    if t.hidden_act not in ACTIVATIONS:
      errors.append(f"text hidden_act {t.hidden_act!r} is not one of {ACTIVATIONS}")
    v = self.vision
    if v is not None:
      if v.out_hidden_size != t.hidden_size:
        errors.append(
            f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
      if v.hidden_size % v.num_heads:
        errors.append(
            f"vision hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
      elif v.head_dim % 4:
        errors.append(f"vision head_dim {v.head_dim} must be a multiple of 4 (2-D rotary)")
      bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
      if bad:
        errors.append(f"fullatt_block_indexes {bad} out of range for vision depth {v.depth}")
      unit = v.patch_size * v.spatial_merge_size
      if v.window_size <= 0 or v.window_size % unit:
        errors.append(
            f"vision window_size {v.window_size} is not a positive multiple of "
            f"patch_size * spatial_merge_size = {unit}")
      if v.hidden_act not in ACTIVATIONS:
        errors.append(f"vision hidden_act {v.hidden_act!r} is not one of {ACTIVATIONS}")
    if self.attention_impl not in ATTENTION_IMPLS:
      errors.append(f"attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if self.causal_blocks < 1:
      errors.append(f"causal_blocks must be >= 1, got {self.causal_blocks}")
    if self.remat not in REMAT_POLICIES:
      errors.append(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
    if errors:
      raise ValueError("invalid Qwen2.5-VL config: " + "; ".join(errors))
    return self

  # ---------------------------------------------------------------- presets

  @classmethod
  def qwen2_5_vl_7b(cls, **overrides) -> ModelConfig:
    return cls(**overrides).validate()

  @classmethod
  def qwen2_5_vl_3b(cls, **overrides) -> ModelConfig:
    text = TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                      num_heads=16, num_kv_heads=2)
    fields = dict(text=text, vision=VisionConfig(out_hidden_size=2048), tie_word_embeddings=True)
    return cls(**{**fields, **overrides}).validate()

  @classmethod
  def tiny(cls, vocab_size: int = 512, **overrides) -> ModelConfig:
    """A model of a few hundred kilobytes for tests and CPU demos; special tokens take the last
    vocabulary ids unless overridden."""
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 3),
                      max_position_embeddings=4096)
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                          out_hidden_size=64, fullatt_block_indexes=(1,))
    fields = dict(text=text, vision=vision, bos_token_id=None, eos_token_id=(vocab_size - 1,),
                  image_token_id=vocab_size - 2, video_token_id=vocab_size - 3,
                  vision_start_token_id=vocab_size - 4, vision_end_token_id=vocab_size - 5)
    return cls(**{**fields, **overrides}).validate()

  # ---------------------------------------------------------------- HF config.json

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """Reads the config.json of Qwen2_5_VLForConditionalGeneration (nested `text_config` of
    transformers >= 4.5x or the original flat layout) or of Qwen2ForCausalLM (text only)."""
    hf = dict(hf)
    text_hf = dict(hf)
    text_hf.update(hf.get("text_config") or {})
    if text_hf.get("use_sliding_window"):
      raise ValueError("use_sliding_window=True (sliding-window text attention) is not supported")
    rope = dict(text_hf.get("rope_scaling") or {})
    rope.update(text_hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
      raise ValueError(f"rope type {rope_type!r} is not supported (only default / mrope)")
    hidden, heads = text_hf["hidden_size"], text_hf["num_attention_heads"]
    head_dim = hidden // heads
    text = TextConfig(
        vocab_size=text_hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=text_hf["intermediate_size"],
        num_layers=text_hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=text_hf.get("num_key_value_heads") or heads,
        rms_norm_eps=text_hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", text_hf.get("rope_theta", 1_000_000.0))),
        # Without vision every position row is equal, so any split of head_dim / 2 is exact.
        mrope_section=tuple(rope.get("mrope_section", (head_dim // 2, 0, 0))),
        max_position_embeddings=text_hf.get("max_position_embeddings", 32768),
        hidden_act=text_hf.get("hidden_act", "silu"),
    )
    vision = None
    if hf.get("vision_config") is not None:
      v = hf["vision_config"]
      vision = VisionConfig(
          depth=v["depth"],
          hidden_size=v["hidden_size"],
          intermediate_size=v["intermediate_size"],
          num_heads=v["num_heads"],
          in_channels=v.get("in_channels", v.get("in_chans", 3)),
          patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
          temporal_patch_size=v.get("temporal_patch_size", 2),
          spatial_merge_size=v.get("spatial_merge_size", 2),
          window_size=v.get("window_size", 112),
          out_hidden_size=v.get("out_hidden_size", hidden),
          fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())),
          hidden_act=v.get("hidden_act", "silu"),
          tokens_per_second=v.get("tokens_per_second", 2),
      )
    eos = text_hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    tie = hf.get("tie_word_embeddings", text_hf.get("tie_word_embeddings", False))
    default = cls()
    fields = dict(
        text=text,
        vision=vision,
        image_token_id=hf.get("image_token_id", default.image_token_id),
        video_token_id=hf.get("video_token_id", default.video_token_id),
        vision_start_token_id=hf.get("vision_start_token_id", default.vision_start_token_id),
        vision_end_token_id=hf.get("vision_end_token_id", default.vision_end_token_id),
        bos_token_id=text_hf.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=text_hf.get("pad_token_id"),
        tie_word_embeddings=bool(tie),
    )
    fields.update(overrides)
    return cls(**fields).validate()

  def to_hf_dict(self) -> dict[str, Any]:
    """config.json in the layout transformers 5 writes (nested text_config / vision_config);
    a text-only config is written as Qwen2ForCausalLM."""
    t = self.text
    eos = list(self.eos_token_id)
    text = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        hidden_act=t.hidden_act,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        use_sliding_window=False,
        bos_token_id=self.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=self.pad_token_id,
    )
    special = dict(image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                   vision_start_token_id=self.vision_start_token_id,
                   vision_end_token_id=self.vision_end_token_id)
    if self.vision is None:
      # Qwen2 has no M-RoPE (all position rows are equal, so mrope_section does not matter);
      # the vision token ids are kept as extra keys for a lossless round trip.
      return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=t.rope_theta,
                  tie_word_embeddings=self.tie_word_embeddings, **text, **special)
    text.update(model_type="qwen2_5_vl_text",
                rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta,
                                     mrope_section=list(t.mrope_section)))
    v = self.vision
    vision = dict(
        model_type="qwen2_5_vl_vision",
        depth=v.depth,
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_heads=v.num_heads,
        in_channels=v.in_channels,
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        spatial_merge_size=v.spatial_merge_size,
        window_size=v.window_size,
        out_hidden_size=v.out_hidden_size,
        fullatt_block_indexes=list(v.fullatt_block_indexes),
        hidden_act=v.hidden_act,
        tokens_per_second=v.tokens_per_second,
    )
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        model_type="qwen2_5_vl",
        text_config=text,
        vision_config=vision,
        **special,
        tie_word_embeddings=self.tie_word_embeddings,
    )
