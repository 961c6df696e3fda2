"""Rollout sampler: one jitted prefill, then a jitted `lax.while_loop` of one-token decode steps.

    sampler = Sampler(model, prompt_buckets=(256, 1024), max_new_tokens=1024,
                      eos_ids=config.eos_token_id, pad_id=pad_id)
    out = sampler(batch["prompt_ids"], batch["prompt_mask"], key=key, num_samples=8,
                  temperature=1.0, top_p=0.99, pixel_values=batch["pixel_values"],
                  image_grid_thw=batch["image_grid_thw"])
    out.tokens  # [B * 8, max_new_tokens]; rows i*8 .. i*8+7 are the group of prompt i

Each prompt (and its images) is prefilled once, so the vision tower and the prompt run once per
prompt, not per rollout; with num_samples > 1 its KV cache then becomes the shared prefix of its
rows (`KVCache.fork`), which decode steps read once per prompt rather than once per row (small,
2 prompts of 512 tokens x 8 rollouts x 256 new tokens: 1.26-1.35x the tokens/s of 8 copies).
Each row's own cache starts with room for a first step of new tokens and grows by that step
each time the decode loop fills it (one loop per size, all in the decode program;
`cache_rooms`): decode attention reads every slot of the cache, so a long response no longer
pays for its full length from its first token on (small, 1,024 new tokens: 1.44-1.50x the
tokens/s of one cache).
Prompts are re-padded on the left to the smallest length in `prompt_buckets`, which bounds the
number of compiled programs to two (prefill, decode) per bucket, batch size, num_samples and
SamplingMode.

Log-probabilities, both per generated token:
  * `logprobs`: log q(token), q the distribution the token was drawn from (temperature, top-k,
    top-p applied and renormalised; 0 under greedy decoding, a point mass).
  * `policy_logprobs`: log pi_theta(token) = log_softmax(logits)[token] at temperature 1 without
    any filtering: the quantity GRPO's importance ratio and KL use. The trainer must score tokens
    with the same convention (plain log_softmax of the model's logits) so that, before any
    update, pi_theta / pi_old = 1 up to the rounding of cached vs. full-sequence attention;
    these values can then serve as pi_old without another forward pass. (verl instead scores
    log_softmax(logits / T_rollout); at the paper's T = 1.0 the two agree.)

Rows are grouped by prompt (row i * num_samples + j is sample j of prompt i), so per-row values
reshape to [prompts, num_samples] for group advantages.

Weights are a jit argument (graphdef and state are split once), so `update_weights` after an
optimiser step reuses the compiled programs. On CPU, a float32 model on one device is run from a
copy with its kernels in column blocks, multiplied by a hand-written kernel
(`cpt_jax.kernels.blocked_matmul`; `weight_layout`): on a 2-core Zen 4 EPYC, rollouts of the
benchmark's small model at 1.0-2.0x (by the machine's phase) and of its 100m model at 1.6-1.8x
the tokens/s of XLA's dots.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

import cpt_jax
from cpt_jax import sharding
from cpt_jax.kernels import blocked_matmul
from cpt_jax.models.qwen2_5_vl import layers
from cpt_jax.models.qwen2_5_vl.model import prepare_inputs
from cpt_jax.models.qwen2_5_vl.text import KVCache

DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class SamplingMode:
  """The static part of the sampling rule; changing it compiles new programs.

  Temperature, top-k and top-p values are traced arguments: changing them does not recompile;
  turning a filter on or off does.
  """
  greedy: bool = False  # argmax (temperature 0)
  # Each filter costs a bisection per step over the rows' probabilities (<= 31 O(V) passes);
  # one that is off is not computed (small, 16 prompts x 8 rollouts x 64 tokens, top-p 0.99
  # alone: 1.12 s per call instead of 1.35 with both bisections).
  top_k: bool = False  # keep the top_k most likely tokens
  top_p: bool = False  # then the most likely whose mass reaches top_p

  @property
  def filtered(self) -> bool:
    return self.top_k or self.top_p


@flax.struct.dataclass
class SamplingState:
  """Everything the decode loop carries; R = batch * num_samples rows, N = max_new_tokens."""
  cache: KVCache
  tokens: jax.Array  # [R, N] int32: sampled tokens, pad_id after EOS
  logprobs: jax.Array  # [R, N] float32: log q(token) under the sampling distribution
  policy_logprobs: jax.Array  # [R, N] float32: log_softmax(logits)[token], temperature 1
  lengths: jax.Array  # [R] int32: tokens generated, EOS included
  done: jax.Array  # [R] bool: the row has emitted an EOS token
  step: jax.Array  # [] int32: tokens sampled so far (columns of `tokens` filled)
  key: jax.Array  # PRNG key of this call; step t draws with fold_in(key, t)


@dataclasses.dataclass
class SampleOutput:
  """Host (numpy) results; R = batch * num_samples, row i * num_samples + j = sample j of prompt i.

  `tokens` hold pad_id after each row's EOS (the EOS itself is kept and counted in `lengths`);
  both log-prob arrays are 0 there. `done` is False for rows cut at max_new_tokens.
  `num_steps` is how many tokens the loop sampled (<= max_new_tokens): up to the step at which
  every row was done, rounded up to the sampler's next check of that (`done_check_every`).
  """
  tokens: np.ndarray  # [R, N] int32
  logprobs: np.ndarray  # [R, N] float32
  policy_logprobs: np.ndarray  # [R, N] float32
  lengths: np.ndarray  # [R] int32
  done: np.ndarray  # [R] bool
  num_steps: int

  @property
  def mask(self) -> np.ndarray:
    """[R, N] int32, 1 on generated tokens (EOS included)."""
    return (np.arange(self.tokens.shape[1])[None] < self.lengths[:, None]).astype(np.int32)


# Inverse-CDF sampling works on blocks of this many tokens: a short cumsum over block totals,
# then one within the chosen block (XLA's CPU cumsum over a whole vocabulary is slow, and
# Gumbel-max needs a random number per token).
_BLOCK = 128


def _pick(weights: jax.Array, u: jax.Array) -> jax.Array:
  """Index i with cum[i-1] <= u < cum[i] for weights [R, n] >= 0 (cum = cumsum); rounding can
  only push it past the ends, so it is clipped to the first / last positive weight."""
  cum = jnp.cumsum(weights, axis=-1)
  index = jnp.sum(cum <= u[:, None], axis=-1)
  positive = weights > 0
  first = jnp.argmax(positive, axis=-1)
  last = weights.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
  return jnp.clip(index, first, last)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
  """One draw per row from softmax(logits [R, n]); -inf entries are never drawn. [R] int32."""
  rows, n = logits.shape
  block = min(_BLOCK, n)
  blocks = -(-n // block)
  logits = jnp.pad(logits, ((0, 0), (0, blocks * block - n)), constant_values=-jnp.inf)
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  weights = weights.reshape(rows, blocks, block)
  block_mass = weights.sum(axis=-1)  # [R, blocks]
  u = jax.random.uniform(key, (rows,)) * block_mass.sum(axis=-1)
  b = _pick(block_mass, u)  # [R]
  before = jnp.take_along_axis(jnp.cumsum(block_mass, axis=-1) - block_mass, b[:, None], -1)
  in_block = jnp.take_along_axis(weights, b[:, None, None], axis=1)[:, 0]  # [R, block]
  j = _pick(in_block, u - before[:, 0])
  return (b * block + j).astype(jnp.int32)


def _largest_threshold(probs: jax.Array, enough) -> jax.Array:
  """Per row of probs [R, V] >= 0, the largest float32 t in [0, max(probs)] with
  enough(probs >= t) true, given it holds at 0 and is monotone (true below some t, false above).

  Bisection over the bit patterns of t, which order non-negative floats as their values do, so
  the threshold is exact in <= 31 O(V) steps; each step compares the floats themselves, one
  array read (4.1 ms for [128, 4096], against 5.7 comparing bit patterns of a second array).
  A while_loop rather than a fixed-count loop, which XLA would unroll (slow to compile).
  """
  as_float = lambda b: jax.lax.bitcast_convert_type(b, jnp.float32)

  def halve(bounds):
    lo, hi = bounds  # enough at lo, not at hi
    mid = lo + (hi - lo) // 2
    ok = enough(probs >= as_float(mid)[:, None])
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo = jnp.zeros(probs.shape[:1], jnp.int32)
  hi = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32) + 1
  return as_float(jax.lax.while_loop(lambda b: jnp.any(b[1] - b[0] > 1), halve, (lo, hi))[0])


def top_k_top_p_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
                     by_k: bool = True, by_p: bool = True) -> jax.Array:
  """[R, V] bool: the top_k most likely tokens, then the most likely of those whose mass
  (renormalised over the top k) reaches top_p. top_k >= V or top_p = 1 turn a filter off, as
  do the static `by_k` / `by_p` = False, which also skip its bisection.

  Both sets are thresholds on the probability p, found exactly by bisection
  (`_largest_threshold`) instead of a sort of the vocabulary (85 ms against 4-6 for [128, 4096]
  on XLA:CPU). Tokens tied at a threshold are all kept.
  """
  probs = jax.nn.softmax(logits, axis=-1)  # [R, V]
  threshold = jnp.zeros(probs.shape[:1], jnp.float32)
  kept = probs
  if by_k:
    threshold = _largest_threshold(probs, lambda keep: keep.sum(axis=-1) >= top_k)
    kept = jnp.where(probs >= threshold[:, None], probs, 0.0)
  if by_p:
    total = kept.sum(axis=-1)
    # Every t <= the top-k threshold keeps all of the top k (mass ratio 1), so the result lies
    # between that threshold and the maximum.
    at_p = _largest_threshold(
        probs, lambda keep: jnp.sum(jnp.where(keep, kept, 0.0), axis=-1) >= top_p * total)
    at_p = jnp.where(top_p >= 1.0, 0.0, at_p)  # not even rounding-level tails are cut
    threshold = jnp.maximum(threshold, at_p)
  return probs >= threshold[:, None]


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, mode: SamplingMode, suppress_ids: Sequence[int] = ()
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws one token per row from logits [R, V] (float32).

  `suppress_ids` are never drawn; then temperature, top-k, and top-p over what is left (the
  order of HF and vLLM). Returns (tokens [R] int32, log q(token) [R],
  log_softmax(logits)[token] [R]), the last over the raw logits.
  """
  raw_logits = logits.astype(jnp.float32)
  logits = raw_logits
  if suppress_ids:
    logits = logits.at[:, jnp.asarray(suppress_ids, jnp.int32)].set(-jnp.inf)
  if mode.greedy:
    # argmax as the first index of the maximum: jnp.argmax's (value, index) pair reduction is a
    # slow loop on XLA:CPU (small greedy decode call 0.96-0.97x with this).
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    tokens = jnp.min(jnp.where(logits == top, index, logits.shape[-1] - 1), axis=-1)
    logprobs = jnp.zeros(tokens.shape, jnp.float32)
  else:
    candidates = logits / temperature
    if mode.filtered:
      keep = top_k_top_p_mask(candidates, top_k, top_p, by_k=mode.top_k, by_p=mode.top_p)
      candidates = jnp.where(keep, candidates, -jnp.inf)
    tokens = categorical(key, candidates)
    chosen = jnp.take_along_axis(candidates, tokens[:, None], axis=-1)[:, 0]
    logprobs = chosen - jax.nn.logsumexp(candidates, axis=-1)
  raw = jnp.take_along_axis(raw_logits, tokens[:, None], axis=-1)[:, 0]
  policy_logprobs = raw - jax.nn.logsumexp(raw_logits, axis=-1)
  return tokens, logprobs, policy_logprobs


PROGRAMS = ("prefill", "decode")


def default_compiler_options(platform: str, program: str,
                             avx512: bool | None = None) -> dict[str, Any]:
  """XLA options of the sampler's `program` ('prefill' or 'decode') on `platform`.

  On CPU (the process default puts dots on Eigen, best for training steps), `cpt_jax.YNN_DOTS`
  for the prefill (100m prefill 1.15 vs 1.31 s on a 2-core AVX2 EPYC, 0.38 vs 0.58 s on an
  AVX-512 Xeon) and, on AVX-512 CPUs (`avx512`, default this host's), for the decode loop,
  whose matmuls have one row per sequence (100m 119 vs 106-111 tokens/s there). Without
  AVX-512 the decode loop keeps Eigen's dots (EPYC: 100m 124 vs 110, small 2,048 vs 1,743
  tokens/s). None when the user's XLA_FLAGS set a ynn_fusion_type; none off CPU.
  """
  if program not in PROGRAMS:
    raise ValueError(f"program must be one of {PROGRAMS}, got {program!r}")
  if platform != "cpu" or cpt_jax.USER_CHOSE_YNN_FUSIONS:
    return {}
  avx512 = cpt_jax.CPU_HAS_AVX512 if avx512 is None else avx512
  return dict(cpt_jax.YNN_DOTS) if program == "prefill" or avx512 else {}


# On Intel AVX-512 CPUs, weights above this size are decoded with kernels stored [out, in]: the
# few-row matmuls of a decode step then read each weight row once, which XLA:CPU's YNNPACK dots
# run faster there when the weights stream from memory (100m, 488 MB: 53 vs 64 ms per step on a
# Xeon with a 105 MiB L3); weights that stay in the last-level cache decode faster as stored
# (small, 20 MB: 2.8 vs 3.7 ms; with a 260 MiB L3, 100m measured the same either way). On AMD
# EPYCs the stored layout is faster for 100m too: AVX2, 8 MiB L3 110 vs 102 tokens/s; AVX-512
# (Zen 4), 32 MiB L3 208 / 224 vs 150 / 156 (Eigen's dots run [out, in] kernels at
# half speed or less).
OUT_IN_MIN_BYTES = 128 * 2**20

# Decode steps between checks that every row is done, when the rows span several devices: the
# check is an all-reduce, which makes the devices wait for each other (small, data-parallel over
# 2 CPU devices: a check every step cost 12% of the call).
SHARDED_DONE_CHECK_EVERY = 8


def default_weight_layout(platform: str, weight_bytes: int, *, float32: bool, one_device: bool,
                          blocks: bool | None = None, avx512: bool | None = None,
                          vendor: str | None = None) -> str:
  """The Sampler's `weight_layout` for 'auto': 'blocks' on CPU for a `float32` model on
  `one_device` where the kernel builds (`blocks`; default: whether it builds on this host);
  otherwise 'out_in' on Intel ('GenuineIntel' `vendor`) CPUs with AVX-512 (`avx512`; both
  default this host's) above OUT_IN_MIN_BYTES, else 'in_out'."""
  if platform != "cpu":
    return "in_out"
  if float32 and one_device and (blocked_matmul.available() if blocks is None else blocks):
    return "blocks"
  avx512 = cpt_jax.CPU_HAS_AVX512 if avx512 is None else avx512
  intel = (cpt_jax.CPU_VENDOR if vendor is None else vendor) == "GenuineIntel"
  return "out_in" if avx512 and intel and weight_bytes > OUT_IN_MIN_BYTES else "in_out"


def _check_blocks(platform: str, mesh: jax.sharding.Mesh | None, dtype) -> None:
  """Raises unless weight_layout 'blocks' can run: CPU, one device, float32, a C++ compiler."""
  if platform != "cpu":
    raise ValueError(f"weight_layout 'blocks' runs on CPU only, not {platform}")
  if mesh is not None and mesh.size > 1:
    raise ValueError(f"weight_layout 'blocks' runs on one device; the mesh has {mesh.size}")
  if jnp.dtype(dtype) != jnp.float32:
    raise ValueError(f"weight_layout 'blocks' computes in float32; the model computes in "
                     f"{jnp.dtype(dtype)}")
  blocked_matmul.library()


def row_devices(mesh: jax.sharding.Mesh | None, rules: sharding.RulesLike = None) -> int:
  """How many devices the rows (the 'batch' logical axis) are split over."""
  if mesh is None:
    return 1
  return mesh.size // sharding.batch_sharding(mesh, rules=rules).shard_shape((mesh.size,))[0]


def cache_rooms(max_new_tokens: int, growth: int | None, max_sizes: int) -> tuple[int, ...]:
  """The decode slots (new tokens fed back: max_new_tokens - 1 in all, as the last sampled token
  is never fed) the KV cache holds in turn: step, 2 * step, ..., max_new_tokens - 1, with
  step >= growth and at most `max_sizes` sizes. Even steps rather than doublings: the long tail
  of a response then attends over few empty slots (small, 1,024 new tokens: steps of 128
  1,013 tokens/s, doublings from 128 881, one cache 677)."""
  full = max_new_tokens - 1
  if growth is None:
    return (full,)
  step = max(growth, -(-full // max_sizes))
  return (*range(step, full, step), full)


class Sampler:
  """Batched autoregressive sampling from a `Qwen2_5_VL` model (see the module docstring).

  Args:
    model: the policy; its weights are read once here (call `update_weights` after training).
    prompt_buckets: padded prompt lengths; a prompt batch is padded to the smallest bucket that
      holds its longest prompt (a longer prompt is an error).
    max_new_tokens: tokens sampled per row (fewer when every row has hit EOS).
    eos_ids: tokens that end a row (kept in the output); empty to always sample max_new_tokens.
    pad_id: fills prompt padding and the tokens after a row's EOS.
    suppress_ids: tokens never sampled. Default: the image/video placeholder and vision
      start/end tokens of a vision model; a sampled `<|image_pad|>` would make the response
      unscorable (the trainer's forward would try to place image features there).
    mesh, rules: with a sharded model (cpt_jax.sharding), the mesh and logical rules to run
      under; prompts are split along the batch like `shard_batch`.
    compiler_options: XLA options (`jax.jit`'s) of both the prefill and decode programs; default
      `default_compiler_options` of the model's platform for each program, `{}` for none.
    weight_layout: 'in_out' runs the model's own arrays; 'out_in' a copy with kernels stored
      [out, in]; 'blocks' (CPU, one device, float32) a copy with kernels in column blocks for
      `cpt_jax.kernels.blocked_matmul` (`Qwen2_5_VL.with_kernel_layout`; a copy is one more set
      of the kernels in memory, remade by every `update_weights`); 'auto' picks by
      `default_weight_layout`.
    cache_growth, max_cache_sizes: the KV cache grows by steps of at least `cache_growth` new
      tokens, in at most `max_cache_sizes` sizes (`cache_rooms`); each size compiles one more
      decode loop body. cache_growth None: one cache for the whole response.
    done_check_every: decode steps between checks that every row is done (then decoding stops;
      the rows done before sample only pad tokens). Default: every step when the rows are on
      one device, SHARDED_DONE_CHECK_EVERY when the mesh splits them.
  """

  def __init__(self, model: nnx.Module, *, max_new_tokens: int, eos_ids: Sequence[int],
               pad_id: int, prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
               suppress_ids: Sequence[int] | None = None,
               mesh: jax.sharding.Mesh | None = None, rules: sharding.RulesLike = None,
               compiler_options: dict[str, Any] | None = None, weight_layout: str = "auto",
               cache_growth: int | None = 128, max_cache_sizes: int = 8,
               done_check_every: int | None = None):
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cache_growth is not None and cache_growth < 1:
      raise ValueError(f"cache_growth must be >= 1 or None, got {cache_growth}")
    if max_cache_sizes < 1:
      raise ValueError(f"max_cache_sizes must be >= 1, got {max_cache_sizes}")
    if done_check_every is not None and done_check_every < 1:
      raise ValueError(f"done_check_every must be >= 1 or None, got {done_check_every}")
    buckets = sorted({int(b) for b in prompt_buckets})
    if not buckets or buckets[0] < 1:
      raise ValueError(f"prompt_buckets must be positive lengths, got {list(prompt_buckets)}")
    self.config = config = model.config
    vocab = config.text.vocab_size
    if suppress_ids is None:
      suppress_ids = (() if config.vision is None else
                      (config.image_token_id, config.video_token_id,
                       config.vision_start_token_id, config.vision_end_token_id))
    for name, ids in (("eos_ids", eos_ids), ("suppress_ids", suppress_ids)):
      bad = [int(i) for i in ids if not 0 <= int(i) < vocab]
      if bad:
        raise ValueError(f"{name} {bad} are outside the vocabulary [0, {vocab})")
    self.suppress_ids = tuple(int(i) for i in suppress_ids)
    self.max_new_tokens = int(max_new_tokens)
    self.cache_rooms = cache_rooms(self.max_new_tokens, cache_growth, max_cache_sizes)
    self.eos_ids = tuple(int(e) for e in eos_ids)
    self.pad_id = int(pad_id)
    self.prompt_buckets = tuple(buckets)
    self.mesh = mesh
    self.rules = rules
    if done_check_every is None:
      done_check_every = SHARDED_DONE_CHECK_EVERY if row_devices(mesh, rules) > 1 else 1
    self.done_check_every = int(done_check_every)
    self.cache_dtype = model.language_model.dtype  # the compute dtype of k and v
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    if weight_layout == "auto":
      weights = nnx.state(model, nnx.Param)
      weight_layout = default_weight_layout(
          platform, sum(x.nbytes for x in jax.tree.leaves(weights)),
          float32=jnp.dtype(self.cache_dtype) == jnp.float32,
          one_device=mesh is None or mesh.size == 1)
    if weight_layout not in layers.KERNEL_LAYOUTS:
      raise ValueError(f"weight_layout must be 'auto' or one of {layers.KERNEL_LAYOUTS}, got "
                       f"{weight_layout!r}")
    if weight_layout == "blocks":
      _check_blocks(platform, mesh, self.cache_dtype)
    self.weight_layout = weight_layout
    self._source_graphdef, source = nnx.split(model)
    self._source_structure = jax.tree.structure(source)
    self._graphdef, self._params = nnx.split(self._decoding_model(model))
    # New weights' decoding copy, made by one program rather than op by op.
    self._relayout = jax.jit(lambda state: nnx.state(
        self._decoding_model(nnx.merge(self._source_graphdef, state))))
    # {program: options}: what each program compiled with.
    self.compiler_options = {
        program: (default_compiler_options(platform, program) if compiler_options is None
                  else dict(compiler_options)) for program in PROGRAMS}
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("num_samples", "mode"),
                            compiler_options=self.compiler_options["prefill"])
    # The state (KV cache and output buffers) is donated: each call consumes the previous
    # state, so XLA updates the cache in place instead of holding two copies of it. A cache
    # that grows is a new buffer anyway (donating it would leave it unused, and say so).
    donate = ("state",) if len(self.cache_rooms) == 1 else ()
    self._decode = jax.jit(self._decode_fn, static_argnames=("mode",), donate_argnames=donate,
                           compiler_options=self.compiler_options["decode"])

  def update_weights(self, model_or_state: nnx.Module | nnx.State) -> None:
    """Samples from new weights (same structure and shapes: nothing recompiles)."""
    state = (nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module)
             else model_or_state)
    if jax.tree.structure(state) != self._source_structure:
      raise ValueError("update_weights: the new state's structure differs from the model's")
    if self.weight_layout != "in_out":
      state = self._relayout(state)
    self._params = state

  def _decoding_model(self, model: nnx.Module) -> nnx.Module:
    return model if self.weight_layout == "in_out" else model.with_kernel_layout(self.weight_layout)

  def compiled_programs(self) -> int:
    """Number of programs compiled so far (prefill + decode variants)."""
    return self._prefill._cache_size() + self._decode._cache_size()

  # ---------------------------------------------------------------- jitted programs

  def _sample(self, logits, key, step, knobs, mode, done):
    tokens, logprobs, policy_logprobs = sample_logits(
        logits, jax.random.fold_in(key, step), *knobs, mode, self.suppress_ids)
    tokens = jnp.where(done, self.pad_id, tokens)
    logprobs = jnp.where(done, 0.0, logprobs)
    policy_logprobs = jnp.where(done, 0.0, policy_logprobs)
    return tokens, logprobs, policy_logprobs

  def _record(self, state: SamplingState, tokens, logprobs, policy_logprobs) -> SamplingState:
    """Writes the tokens sampled at `state.step` into column `step` and advances the flags."""
    col = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype),
                                                      (0, state.step))
    is_eos = jnp.isin(tokens, jnp.asarray(self.eos_ids, jnp.int32)) if self.eos_ids else False
    return state.replace(
        tokens=col(state.tokens, tokens), logprobs=col(state.logprobs, logprobs),
        policy_logprobs=col(state.policy_logprobs, policy_logprobs),
        lengths=state.lengths + (~state.done).astype(jnp.int32),
        done=state.done | is_eos, step=state.step + 1)

  def _prefill_fn(self, params, input_ids, attention_mask, pixel_values, position_ids,
                  vision_inputs, key, knobs, *, num_samples: int,
                  mode: SamplingMode) -> SamplingState:
    """Prompt [B, S] -> state with the first token of B * num_samples rows sampled."""
    model = nnx.merge(self._graphdef, params)
    batch, length = input_ids.shape
    # A cache of exactly the prompt's slots: its attention skips the masked triangle.
    cache = model.init_cache(batch, length, self.cache_dtype)
    logits, cache = model.prefill(input_ids, attention_mask, cache, pixel_values=pixel_values,
                                  position_ids=position_ids, vision_inputs=vision_inputs)
    rows = batch * num_samples
    logits = jnp.repeat(logits, num_samples, axis=0)  # [R, V]
    # n > 1 rows per prompt share its slots; one row keeps them in its own cache.
    room = self.cache_rooms[0]
    cache = cache.fork(num_samples, room) if num_samples > 1 else cache.grow(length + room)
    buffer = lambda dtype, fill: sharding.constrain(
        jnp.full((rows, self.max_new_tokens), fill, dtype), ("batch", None))
    state = SamplingState(
        cache=cache, tokens=buffer(jnp.int32, self.pad_id), logprobs=buffer(jnp.float32, 0.0),
        policy_logprobs=buffer(jnp.float32, 0.0), lengths=jnp.zeros((rows,), jnp.int32),
        done=jnp.zeros((rows,), bool), step=jnp.zeros((), jnp.int32), key=key)
    sampled = self._sample(logits, key, state.step, knobs, mode, state.done)
    return self._record(state, *sampled)

  def _decode_fn(self, params, state: SamplingState, knobs, *,
                 mode: SamplingMode) -> SamplingState:
    """Samples until every row is done or max_new_tokens columns are filled."""
    model = nnx.merge(self._graphdef, params)
    prompt_slots = state.cache.max_len - self.cache_rooms[0]  # 0 in a forked cache

    def step(state: SamplingState) -> SamplingState:
      last = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)  # [R, 1]
      logits, cache = model.decode_step(last, state.cache)
      sampled = self._sample(logits, state.key, state.step, knobs, mode, state.done)
      return self._record(state.replace(cache=cache), *sampled)

    def steps(state: SamplingState, room: int) -> SamplingState:
      """Up to done_check_every steps, within the room (no cross-row reduction)."""
      stop = jnp.minimum(state.step + self.done_check_every, room + 1)
      return jax.lax.while_loop(lambda state: state.step < stop, step, state)

    for room in self.cache_rooms:
      # The step that samples column t feeds token t - 1 into decode slot t - 1; the last room
      # is max_new_tokens - 1 slots, so `step <= room` also ends the loop at max_new_tokens.
      keep_going = lambda state, room=room: (state.step <= room) & ~jnp.all(state.done)
      state = state.replace(cache=state.cache.grow(prompt_slots + room))
      body = step if self.done_check_every == 1 else functools.partial(steps, room=room)
      state = jax.lax.while_loop(keep_going, body, state)
    return state

  # ---------------------------------------------------------------- host side

  def _bucket(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray):
    """Trims all-padding columns and left-pads to the smallest bucket that fits."""
    real = prompt_mask.astype(bool)
    if not real.any(axis=1).all():
      empty = np.flatnonzero(~real.any(axis=1)).tolist()
      raise ValueError(f"prompt rows {empty} have no real token (prompt_mask all 0)")
    columns = np.flatnonzero(real.any(axis=0))
    ids = prompt_ids[:, columns[0]:columns[-1] + 1]
    mask = prompt_mask[:, columns[0]:columns[-1] + 1]
    length = ids.shape[1]
    if jax.process_count() > 1:  # every process must pick the same bucket
      length = int(np.max(multihost_utils.process_allgather(np.int32(length))))
    fitting = [b for b in self.prompt_buckets if b >= length]
    if not fitting:
      raise ValueError(f"prompt length {length} exceeds the largest prompt bucket "
                       f"{self.prompt_buckets[-1]}")
    pad = fitting[0] - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=self.pad_id)
    mask = np.pad(mask, ((0, 0), (pad, 0)), constant_values=0)
    return ids.astype(np.int32), mask.astype(np.int32)

  def __call__(self, prompt_ids, prompt_mask, *, key: jax.Array, num_samples: int = 1,
               temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
               pixel_values=None, image_grid_thw=None) -> SampleOutput:
    """Samples `num_samples` continuations of each prompt.

    prompt_ids, prompt_mask: [B, S] (numpy; left padding expected, any padding accepted);
    pixel_values [P, C*T*P*P] and image_grid_thw [I, 3] for the images of the batch, in order.
    temperature 0 decodes greedily (top_k / top_p ignored). Returns host arrays.
    """
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
      raise ValueError(f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} "
                       "must both be [batch, length]")
    if num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
      raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if (pixel_values is None) != (image_grid_thw is None):
      raise ValueError("pass pixel_values and image_grid_thw together")
    vocab = self.config.text.vocab_size
    top_k = vocab if top_k is None else min(int(top_k), vocab)
    greedy = temperature == 0.0
    mode = SamplingMode(greedy=greedy, top_k=not greedy and top_k < vocab,
                        top_p=not greedy and top_p < 1.0)
    ids, mask = self._bucket(prompt_ids, prompt_mask)
    grids = None if image_grid_thw is None else np.asarray(image_grid_thw)
    extra = prepare_inputs(self.config, ids, mask, grids)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=extra["position_ids"])
    replicated = dict(pixel_values=pixel_values, vision_inputs=extra["vision_inputs"])
    # (temperature, top_k, top_p): traced, so new values reuse the compiled programs.
    knobs = (np.float32(temperature), np.int32(top_k), np.float32(top_p))
    with self._context():
      # Every host array moves to the device here, explicitly; nothing else crosses until the
      # results come back (a call passes jax.transfer_guard("disallow")).
      if self.mesh is None:
        inputs, replicated, knobs = jax.device_put((inputs, replicated, knobs))
      else:
        inputs = sharding.shard_batch(inputs, self.mesh, rules=self.rules)
        replicated, knobs = jax.device_put((replicated, knobs), jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec()))
      state = self._prefill(self._params, inputs["input_ids"], inputs["attention_mask"],
                            replicated["pixel_values"], inputs["position_ids"],
                            replicated["vision_inputs"], key, knobs,
                            num_samples=int(num_samples), mode=mode)
      if self.max_new_tokens > 1:  # prefill sampled the first token
        state = self._decode(self._params, state, knobs, mode=mode)
      out = (state.tokens, state.logprobs, state.policy_logprobs, state.lengths, state.done,
             state.step)
      if jax.process_count() > 1:
        # Every process gets the rows of the whole global batch.
        out = multihost_utils.process_allgather(out, tiled=True)
      out = jax.device_get(out)
    tokens, logprobs, policy_logprobs, lengths, done, steps = out
    return SampleOutput(tokens=np.asarray(tokens), logprobs=np.asarray(logprobs),
                        policy_logprobs=np.asarray(policy_logprobs),
                        lengths=np.asarray(lengths), done=np.asarray(done), num_steps=int(steps))

  def _context(self) -> Any:
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding.use_mesh(self.mesh, self.rules)
