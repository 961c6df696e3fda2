"""Hugging Face checkpoint <-> NNX parameters: the key/transform table, and local loading.

`PARAM_TABLE` maps every NNX parameter path to its HF key in the original checkpoint layout
(`visual.*`, `model.*`, `lm_head.weight`; what `save_pretrained` still writes). Checkpoints in
the layout of newer in-memory modules (`model.visual.*`, `model.language_model.*`) are renamed
to it first (`canonical_hf_key`). Each row names a `Transform` that converts both ways, so an
exporter can walk the same table backwards.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from cpt_jax.models.qwen2_5_vl.config import ModelConfig
from cpt_jax.models.qwen2_5_vl.model import Qwen2_5_VL


@dataclasses.dataclass(frozen=True)
class Transform:
  """How an HF tensor becomes an NNX parameter.

  copy:    same shape (norm scales, the embedding table).
  reshape: HF [prod(shape)] -> NNX shape (biases split into heads).
  linear:  HF torch Linear weight [out, in] -> NNX kernel [*in_shape, *out_shape], whose first
           `n_in` axes are the input axes.
  conv3d:  HF Conv3d weight [E, C, T, P, P] with stride == kernel -> NNX kernel [C*T*P*P, E].
  """
  kind: str
  n_in: int = 1

  def hf_shape(self, nnx_shape: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
    if self.kind == "copy":
      return nnx_shape
    if self.kind == "reshape":
      return (math.prod(nnx_shape),)
    if self.kind == "linear":
      return (math.prod(nnx_shape[self.n_in:]), math.prod(nnx_shape[:self.n_in]))
    v = config.vision
    return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)

  def to_nnx(self, w: np.ndarray, nnx_shape: tuple[int, ...]) -> np.ndarray:
    if self.kind in ("linear", "conv3d"):
      w = w.reshape(w.shape[0], -1).T
    return w.reshape(nnx_shape)

  def to_hf(self, x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    if self.kind in ("linear", "conv3d"):
      x = x.reshape(-1, hf_shape[0]).T
    return x.reshape(hf_shape)


COPY, RESHAPE, LINEAR = Transform("copy"), Transform("reshape"), Transform("linear")
LINEAR_FROM_HEADS = Transform("linear", n_in=2)  # kernel [H, D, E]: input axes are (heads, dim)
CONV3D = Transform("conv3d")

# (NNX parameter path, HF key in the original layout, transform)
PARAM_TABLE: tuple[tuple[str, str, Transform], ...] = (
    # vision tower
    (r"visual\.patch_embed\.kernel", r"visual.patch_embed.proj.weight", CONV3D),
    (r"visual\.blocks\.(\d+)\.(norm1|norm2)\.scale", r"visual.blocks.\1.\2.weight", COPY),
    (r"visual\.blocks\.(\d+)\.attn\.qkv\.kernel", r"visual.blocks.\1.attn.qkv.weight", LINEAR),
    (r"visual\.blocks\.(\d+)\.attn\.proj\.kernel", r"visual.blocks.\1.attn.proj.weight",
     LINEAR_FROM_HEADS),
    (r"visual\.blocks\.(\d+)\.attn\.(qkv|proj)\.bias", r"visual.blocks.\1.attn.\2.bias", RESHAPE),
    (r"visual\.blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.kernel",
     r"visual.blocks.\1.mlp.\2.weight", LINEAR),
    (r"visual\.blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias",
     r"visual.blocks.\1.mlp.\2.bias", COPY),
    (r"visual\.merger\.ln_q\.scale", r"visual.merger.ln_q.weight", COPY),
    (r"visual\.merger\.fc1\.kernel", r"visual.merger.mlp.0.weight", LINEAR),
    (r"visual\.merger\.fc1\.bias", r"visual.merger.mlp.0.bias", COPY),
    (r"visual\.merger\.fc2\.kernel", r"visual.merger.mlp.2.weight", LINEAR),
    (r"visual\.merger\.fc2\.bias", r"visual.merger.mlp.2.bias", COPY),
    # decoder
    (r"language_model\.embed_tokens", r"model.embed_tokens.weight", COPY),
    (r"language_model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.scale",
     r"model.layers.\1.\2.weight", COPY),
    (r"language_model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.kernel",
     r"model.layers.\1.self_attn.\2.weight", LINEAR),
    (r"language_model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.bias",
     r"model.layers.\1.self_attn.\2.bias", RESHAPE),
    (r"language_model\.layers\.(\d+)\.self_attn\.o_proj\.kernel",
     r"model.layers.\1.self_attn.o_proj.weight", LINEAR_FROM_HEADS),
    (r"language_model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.kernel",
     r"model.layers.\1.mlp.\2.weight", LINEAR),
    (r"language_model\.norm\.scale", r"model.norm.weight", COPY),
    (r"lm_head", r"lm_head.weight", LINEAR),
)

# Newer module tree prefix -> original checkpoint prefix.
_LAYOUT_RENAMES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def canonical_hf_key(key: str) -> str:
  """Maps either HF key layout to the original one (`visual.*`, `model.*`, `lm_head.weight`)."""
  for new, old in _LAYOUT_RENAMES:
    if key.startswith(new):
      return old + key[len(new):]
  return key


def hf_key_for(nnx_path: str) -> tuple[str, Transform]:
  """NNX parameter path ('language_model.layers.0.mlp.up_proj.kernel') -> (HF key, transform)."""
  for pattern, template, transform in PARAM_TABLE:
    match = re.fullmatch(pattern, nnx_path)
    if match:
      return match.expand(template), transform
  raise KeyError(f"no HF key for parameter {nnx_path!r} in PARAM_TABLE")


def _param_paths(model: Qwen2_5_VL) -> Iterator[tuple[tuple, nnx.Variable]]:
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    yield path, variable


def load_hf_state(model: Qwen2_5_VL, tensors: Mapping[str, np.ndarray]) -> Qwen2_5_VL:
  """Fills `model`'s parameters (in place; also works on an `nnx.eval_shape` model) from HF
  tensors in either key layout. Raises ValueError naming missing, unexpected and misshapen
  tensors. Values are cast to each parameter's dtype."""
  canonical: dict[str, str] = {}
  for key in tensors:
    ckey = canonical_hf_key(key)
    if ckey in canonical:
      raise ValueError(f"checkpoint holds both {canonical[ckey]!r} and {key!r}")
    canonical[ckey] = key
  used, missing, mismatched = set(), [], []
  updates = []
  for path, variable in _param_paths(model):
    nnx_path = ".".join(str(p) for p in path)
    hf_key, transform = hf_key_for(nnx_path)
    if hf_key not in canonical:
      missing.append(hf_key)
      continue
    used.add(hf_key)
    w = tensors[canonical[hf_key]]
    nnx_shape = tuple(variable.shape)
    expected = transform.hf_shape(nnx_shape, model.config)
    if tuple(w.shape) != expected:
      mismatched.append(f"{canonical[hf_key]}: checkpoint shape {tuple(w.shape)}, model expects "
                        f"{expected} (for {nnx_path} of shape {nnx_shape})")
      continue
    updates.append((variable, transform.to_nnx(np.asarray(w), nnx_shape)))
  unexpected = sorted(set(canonical) - used)
  if model.config.tie_word_embeddings and "lm_head.weight" in unexpected:
    unexpected.remove("lm_head.weight")  # a tied head duplicates the embedding table
  if missing or unexpected or mismatched:
    problems = []
    if missing:
      problems.append(f"missing tensors {missing}")
    if unexpected:
      problems.append(f"unexpected tensors {[canonical[k] for k in unexpected]}")
    if mismatched:
      problems.append("shape mismatches: " + "; ".join(mismatched))
    raise ValueError("checkpoint does not match the model: " + " | ".join(problems))
  for variable, value in updates:
    variable.set_value(jnp.asarray(value, dtype=variable.dtype))
  return model


# ------------------------------------------------------------------ safetensors (numpy)

# safetensors' numpy API has no bfloat16, which real Qwen checkpoints use; the file format is a
# little-endian u64 header length, a JSON header, then raw little-endian tensor bytes.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Memory-mapped numpy views of every tensor in one .safetensors file."""
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    out[name] = data[begin:end].view(dtype).reshape(info["shape"])
  return out


def checkpoint_files(path: str | os.PathLike) -> list[str]:
  """The .safetensors files of a checkpoint directory (sharded index or a single file)."""
  path = os.fspath(path)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, n) for n in names]
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
  """ModelConfig from a checkpoint directory's config.json (overrides: ModelConfig fields)."""
  config_file = os.path.join(os.fspath(path), "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}")
  with open(config_file) as f:
    return ModelConfig.from_hf_dict(json.load(f), **overrides)


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32,
                    **config_overrides) -> Qwen2_5_VL:
  """Builds a model from a local HF checkpoint directory (config.json + safetensors).

  The model is created abstractly (no random init) and filled from the memory-mapped files.
  `config_overrides` set ModelConfig fields that config.json lacks (attention_impl, remat).
  """
  config = load_config(path, **config_overrides)
  model = nnx.eval_shape(
      lambda: Qwen2_5_VL(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  tensors = {}
  for file in checkpoint_files(path):
    tensors.update(read_safetensors(file))
  return load_hf_state(model, tensors)
