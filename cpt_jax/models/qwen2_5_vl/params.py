"""Hugging Face checkpoint <-> NNX parameters: the key/transform table, loading and saving.

`PARAM_TABLE` maps every NNX parameter path to its HF key in the original checkpoint layout
(`visual.*`, `model.*`, `lm_head.weight`; what transformers' `save_pretrained` still writes
and what `save_pretrained` here writes). Checkpoints in the layout of newer in-memory modules
(`model.visual.*`, `model.language_model.*`) are renamed to it first (`canonical_hf_key`).
Each row names a `Transform` that converts both ways.

`load_pretrained` streams: every tensor is memory-mapped on its own, converted, cast and placed
on its target sharding, then unmapped, so host memory holds about one tensor at a time (plus,
on the CPU backend, the model itself, since there device memory is host memory).
`save_pretrained` gathers and writes one tensor at a time in the same way.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from cpt_jax import sharding as sharding_lib
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


def param_paths(model: Qwen2_5_VL) -> Iterator[tuple[str, nnx.Variable]]:
  """('language_model.layers.0.mlp.up_proj.kernel', Param) for every parameter."""
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    yield ".".join(str(p) for p in path), variable


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where one parameter comes from: its variable, and the checkpoint tensor that fills it."""
  nnx_path: str
  variable: nnx.Variable
  key: str  # as spelled in the checkpoint (either layout)
  transform: Transform


def _match(model: Qwen2_5_VL, shapes: Mapping[str, Sequence[int]]) -> list[_Source]:
  """Pairs every parameter of `model` with a checkpoint tensor given the tensors' shapes.

  Raises one ValueError naming every missing, unexpected and misshapen tensor.
  """
  canonical: dict[str, str] = {}
  for key in shapes:
    ckey = canonical_hf_key(key)
    if ckey in canonical:
      raise ValueError(f"checkpoint holds both {canonical[ckey]!r} and {key!r}")
    canonical[ckey] = key
  used, missing, mismatched, sources = set(), [], [], []
  for nnx_path, variable in param_paths(model):
    hf_key, transform = hf_key_for(nnx_path)
    if hf_key not in canonical:
      missing.append(hf_key)
      continue
    used.add(hf_key)
    key = canonical[hf_key]
    nnx_shape = tuple(variable.shape)
    expected = transform.hf_shape(nnx_shape, model.config)
    if tuple(shapes[key]) != expected:
      mismatched.append(f"{key}: checkpoint shape {tuple(shapes[key])}, model expects "
                        f"{expected} (for {nnx_path} of shape {nnx_shape})")
      continue
    sources.append(_Source(nnx_path, variable, key, transform))
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
  return sources


def load_hf_state(model: Qwen2_5_VL, tensors: Mapping[str, np.ndarray]) -> Qwen2_5_VL:
  """Fills `model`'s parameters (in place; also works on an `nnx.eval_shape` model) from
  in-memory HF tensors in either key layout. Raises ValueError naming missing, unexpected and
  misshapen tensors. Values are cast to each parameter's dtype."""
  sources = _match(model, {key: np.shape(w) for key, w in tensors.items()})
  for s in sources:
    value = s.transform.to_nnx(np.asarray(tensors[s.key]), tuple(s.variable.shape))
    s.variable.set_value(jnp.asarray(value, dtype=s.variable.dtype))
  return model


# ------------------------------------------------------------------ safetensors (numpy)

# safetensors' numpy API has no bfloat16, which real Qwen checkpoints use; the file format is a
# little-endian u64 header length, a JSON header, then raw little-endian tensor bytes.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_SAFETENSORS_NAMES = {np.dtype(t): name for name, t in _SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of a .safetensors file, located without reading it."""
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # byte offset of the data in `file`
  nbytes: int

  def open(self) -> np.ndarray:
    """A read-only view of the tensor, memory-mapped on its own: the mapping (and the page
    cache pages it made resident) is released when the last view of it is dropped."""
    if self.nbytes == 0:
      return np.zeros(self.shape, self.dtype)
    return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
  """Name -> TensorInfo for every tensor of one .safetensors file (reads the header only)."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
  header.pop("__metadata__", None)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    out[name] = TensorInfo(path, np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]),
                           tuple(info["shape"]), 8 + header_len + begin, end - begin)
  return out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Memory-mapped numpy views of every tensor in one .safetensors file."""
  return {name: info.open() for name, info in safetensors_header(path).items()}


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


def checkpoint_tensors(path: str | os.PathLike) -> dict[str, TensorInfo]:
  """Name -> TensorInfo over all files of a checkpoint directory (headers only).

  With an index, every tensor it lists must be in the file it names.
  """
  path = os.fspath(path)
  tensors: dict[str, TensorInfo] = {}
  for file in checkpoint_files(path):
    for name, info in safetensors_header(file).items():
      if name in tensors:
        raise ValueError(f"tensor {name!r} is in both {tensors[name].file} and {file}")
      tensors[name] = info
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    absent = sorted(k for k, file in weight_map.items()
                    if k not in tensors or os.path.basename(tensors[k].file) != file)
    if absent:
      raise ValueError(f"{index} lists tensors not found in the files it names: {absent}")
  return tensors


# ------------------------------------------------------------------ config.json

# model_type -> architecture that cpt_jax reproduces.
SUPPORTED_ARCHITECTURES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                           "qwen2": "Qwen2ForCausalLM"}


def check_hf_config(hf: Mapping[str, Any], source: str = "config.json") -> None:
  """Raises ValueError unless `hf` is the config.json of a Qwen2.5-VL or Qwen2 model."""
  model_type, architectures = hf.get("model_type"), list(hf.get("architectures") or [])
  if model_type in SUPPORTED_ARCHITECTURES:
    return
  if model_type is None and set(architectures) & set(SUPPORTED_ARCHITECTURES.values()):
    return
  raise ValueError(
      f"{source} is not a Qwen2.5-VL or Qwen2 config: found model_type={model_type!r}, "
      f"architectures={architectures}; supported: " +
      ", ".join(f"model_type {t!r} ({a})" for t, a in SUPPORTED_ARCHITECTURES.items()))


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
  """ModelConfig from a checkpoint directory's config.json (overrides: ModelConfig fields)."""
  config_file = os.path.join(os.fspath(path), "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}")
  with open(config_file) as f:
    hf = json.load(f)
  check_hf_config(hf, config_file)
  return ModelConfig.from_hf_dict(hf, **overrides)


# ------------------------------------------------------------------ loading


def abstract_model(config: ModelConfig, dtype=jnp.float32, param_dtype=jnp.float32) -> Qwen2_5_VL:
  """The model with shape-only parameters (no init). jax.eval_shape rather than
  nnx.eval_shape: under a mesh context the latter reads logical axis names as mesh axes."""
  graphdefs = []

  def init():
    graphdef, state = nnx.split(
        Qwen2_5_VL(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdefs.append(graphdef)
    return state

  state = jax.eval_shape(init)
  return nnx.merge(graphdefs[-1], state)


def _place(source: np.ndarray, dtype: np.dtype, sharding: jax.sharding.Sharding | None):
  """`source` (a view of a mapped tensor, NNX layout) as a jax.Array cast to `dtype`.

  Without a sharding the array is uncommitted on the default device. With one, each
  addressable device receives a copy of just its slice; devices holding the same slice
  share one host copy.
  """
  if sharding is None:
    return jax.device_put(np.array(source, dtype=dtype))
  copies: dict[tuple, np.ndarray] = {}

  def shard(index: tuple[slice, ...]) -> np.ndarray:
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in copies:
      copies[key] = np.array(source[index], dtype=dtype)
    return copies[key]

  return jax.make_array_from_callback(source.shape, sharding, shard)


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32, *,
                    mesh: Mesh | None = None, rules: sharding_lib.RulesLike = None,
                    **config_overrides) -> Qwen2_5_VL:
  """Builds a model from a local HF checkpoint directory (config.json + safetensors).

  Args:
    path: a directory with config.json (Qwen2.5-VL or Qwen2) and model.safetensors, or shards
      listed in model.safetensors.index.json; either key layout; tied or untied lm_head.
    dtype: compute dtype of the model.
    param_dtype: dtype the weights are cast to.
    mesh: places every parameter directly on its sharding (cpt_jax.sharding.param_shardings);
      each process copies out only its own devices' slices (file pages are read on demand).
      None: one device, uncommitted.
    rules: logical-axis rules (a preset name or table; None: the rules active in this context).
    **config_overrides: ModelConfig fields that config.json lacks (attention_impl, remat).

  The model is created abstractly (no random init); tensors are checked against it (names and
  shapes, all problems in one ValueError) before any is read, then streamed one at a time.
  """
  config = load_config(path, **config_overrides)
  model = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
  tensors = checkpoint_tensors(path)
  sources = _match(model, {key: info.shape for key, info in tensors.items()})
  shardings = {}
  if mesh is not None:
    shardings = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(
        sharding_lib.param_shardings(nnx.state(model, nnx.Param), mesh, rules))}
  for s in sources:
    view = s.transform.to_nnx(tensors[s.key].open(), tuple(s.variable.shape))
    s.variable.set_value(_place(view, np.dtype(s.variable.dtype), shardings.get(s.nnx_path)))
    del view  # unmaps the tensor
  return model


# ------------------------------------------------------------------ saving

# Files next to the weights that describe how to feed the model; copied by `save_pretrained`.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string like '5GB', '100KB' or '2GiB' (HF's max_shard_size)."""
  if isinstance(size, (int, np.integer)):
    return int(size)
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(size).upper())
  if not match:
    raise ValueError(f"size {size!r} is not a byte count or a string like '5GB' / '500MB'")
  return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


@dataclasses.dataclass(frozen=True)
class _Target:
  """One tensor to write: its HF name, shape and dtype, and where its value comes from."""
  key: str
  shape: tuple[int, ...]
  dtype: np.dtype
  variable: nnx.Variable
  transform: Transform

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def _host_array(x: jax.Array) -> np.ndarray:
  """The whole value of `x` on this host (a collective when other processes hold parts)."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  # np.asarray caches the host value on the array it reads; reading a throwaway device copy
  # keeps that cache from holding a second copy of the model on the host.
  return np.asarray(jax.device_put(x, x.sharding, may_alias=False))


def _write_safetensors(file: str | None, targets: Sequence[_Target],
                       produce: Callable[[_Target], np.ndarray]) -> None:
  """Writes `targets` to `file` in order, producing one tensor at a time.

  `file` None: produce every tensor (collectives) but write nothing (processes other than 0).
  """
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for t in targets:
    header[t.key] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
  f = None if file is None else open(file, "wb")
  try:
    if f is not None:
      f.write(len(encoded).to_bytes(8, "little") + encoded)
    for t in targets:
      value = np.ascontiguousarray(produce(t), dtype=t.dtype)
      if value.shape != t.shape:
        raise ValueError(f"{t.key}: produced shape {value.shape}, header says {t.shape}")
      if f is not None:
        f.write(value.reshape(-1).view(np.uint8).data)
  finally:
    if f is not None:
      f.close()


def _shard_groups(targets: Sequence[_Target], max_bytes: int) -> list[list[_Target]]:
  """Consecutive groups of at most `max_bytes` (a larger tensor gets a file of its own)."""
  groups: list[list[_Target]] = [[]]
  size = 0
  for t in targets:
    if groups[-1] and size + t.nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(t)
    size += t.nbytes
  return groups


def _remove_old_weights(path: str) -> None:
  """Weight files of an earlier save: a stale index would point loaders at stale shards."""
  for name in ["model.safetensors", "model.safetensors.index.json",
               *map(os.path.basename, glob.glob(os.path.join(path, "model-*-of-*.safetensors")))]:
    if os.path.exists(os.path.join(path, name)):
      os.remove(os.path.join(path, name))


def _dtype_name(dtype: np.dtype) -> str:
  return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.name


def save_pretrained(model: Qwen2_5_VL, path: str | os.PathLike, *, dtype=None,
                    max_shard_size: int | str = "5GB",
                    tokenizer_dir: str | os.PathLike | None = None) -> str:
  """Writes `model` as a Hugging Face checkpoint directory; returns `path`.

  Weights go to model.safetensors, or to model-0000k-of-0000n.safetensors files of at most
  `max_shard_size` bytes with model.safetensors.index.json, in the original key layout
  (`transformers` loads it into Qwen2_5_VLForConditionalGeneration, or Qwen2ForCausalLM for a
  text-only config); a tied head is not written. config.json comes from `model.config`.
  `dtype` casts every tensor (None: each parameter's own dtype). Tokenizer and processor files
  of `tokenizer_dir` are copied; a generation_config.json with the special token ids is written
  when none is copied. Tensors are gathered one at a time; in a multi-process run every
  process must call this (gathers are collectives) and process 0 writes.
  """
  if model.kernel_layout != "in_out":
    raise ValueError(f"save_pretrained: this is a decoding copy with kernels stored "
                     f"{model.kernel_layout!r} (with_kernel_layout); save the model it was made "
                     f"from")
  path = os.fspath(path)
  config = model.config
  targets = []
  for nnx_path, variable in param_paths(model):
    key, transform = hf_key_for(nnx_path)
    out_dtype = np.dtype(variable.dtype if dtype is None else dtype)
    if out_dtype not in _SAFETENSORS_NAMES:
      raise ValueError(f"dtype {out_dtype} cannot be stored in safetensors")
    targets.append(_Target(key, transform.hf_shape(tuple(variable.shape), config), out_dtype,
                           variable, transform))
  groups = _shard_groups(targets, parse_size(max_shard_size))
  names = (["model.safetensors"] if len(groups) == 1 else
           [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
    _remove_old_weights(path)

  def produce(t: _Target) -> np.ndarray:
    return t.transform.to_hf(_host_array(t.variable.get_value()), t.shape)

  for name, group in zip(names, groups):
    _write_safetensors(os.path.join(path, name) if writer else None, group, produce)
  if writer:
    if len(groups) > 1:
      index = {"metadata": {"total_size": sum(t.nbytes for t in targets)},
               "weight_map": {t.key: name for name, g in zip(names, groups) for t in g}}
      _write_json(os.path.join(path, "model.safetensors.index.json"), index)
    dtypes = {t.dtype for t in targets}
    hf_config = config.to_hf_dict()
    if len(dtypes) == 1:
      hf_config["dtype"] = _dtype_name(dtypes.pop())
    _write_json(os.path.join(path, "config.json"), hf_config)
    copied = copy_tokenizer_files(tokenizer_dir, path) if tokenizer_dir is not None else []
    if "generation_config.json" not in copied:
      eos = list(config.eos_token_id)
      _write_json(os.path.join(path, "generation_config.json"), {
          "bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
          "eos_token_id": eos[0] if len(eos) == 1 else eos})
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"save_pretrained {path}")
  return path


def copy_tokenizer_files(source: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
  """Copies the TOKENIZER_FILES present in `source` to `dest`; returns their names."""
  source, dest = os.fspath(source), os.fspath(dest)
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
  if not any(n.startswith("tokenizer") for n in names):
    raise FileNotFoundError(f"no tokenizer files (tokenizer.json, tokenizer_config.json) in "
                            f"{source!r}")
  os.makedirs(dest, exist_ok=True)
  for n in names:
    shutil.copyfile(os.path.join(source, n), os.path.join(dest, n))
  return names


def _write_json(file: str, value: Any) -> None:
  with open(file, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")
