"""Rollout sampler: HF-equal greedy decoding (images, left padding, bucketing, n > 1 repeats),
seeded and correctly distributed sampling, EOS handling, log-probs equal to the full forward,
and a sharded run equal to the single-device one."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.special
import torch
import transformers
from flax import nnx

import cpt_jax
import hf_fixtures
from cpt_jax import sharding
from cpt_jax.models import load_pretrained, prepare_inputs
from cpt_jax.rl.sampler import (OUT_IN_MIN_BYTES, PROGRAMS, SHARDED_DONE_CHECK_EVERY, Sampler,
                                SamplingMode, cache_rooms, default_compiler_options,
                                default_weight_layout, row_devices, sample_logits)

NEW_TOKENS = 12
GRIDS = [(1, 4, 8), (1, 8, 4)]
BUCKETS = (16, 96, 192)  # the image prompts (62 and 79 tokens) get 17 extra pad columns
SAMPLES = 2
SAMPLING = dict(temperature=0.7, top_k=40, top_p=0.9)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return hf_fixtures.checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def model(ckpt):
  return load_pretrained(ckpt.path)


@pytest.fixture(scope="module")
def special(ckpt):
  tok = ckpt.tokenizer
  return dict(eos=tok.convert_tokens_to_ids("<|im_end|>"),
              pad=tok.convert_tokens_to_ids("<|endoftext|>"))


@pytest.fixture(scope="module")
def prompt(ckpt, special):
  """Two prompts of different lengths with one image each, left-padded (an RFT prompt batch)."""
  rows = [hf_fixtures.prompt_ids(ckpt, [GRIDS[0], "What color?"]),
          hf_fixtures.prompt_ids(ckpt, ["How many red spheres are there in the picture?",
                                        GRIDS[1]])]
  ids, mask = hf_fixtures.pad_batch(rows, pad_id=special["pad"], side="left")
  return dict(ids=ids, mask=mask, pixels=hf_fixtures.random_pixels(GRIDS), grids=np.asarray(GRIDS))


@pytest.fixture(scope="module")
def sampler(model, special):
  return Sampler(model, prompt_buckets=BUCKETS, max_new_tokens=NEW_TOKENS,
                 eos_ids=(special["eos"],), pad_id=special["pad"])


def run(sampler, prompt, key=0, num_samples=SAMPLES, **kw):
  return sampler(prompt["ids"], prompt["mask"], key=jax.random.key(key), num_samples=num_samples,
                 pixel_values=prompt["pixels"], image_grid_thw=prompt["grids"], **kw)


@pytest.fixture(scope="module")
def greedy(sampler, prompt):
  return run(sampler, prompt, temperature=0.0)


def hf_generate(ckpt, prompt, special, new_tokens):
  kwargs = hf_fixtures.hf_inputs(ckpt, prompt["ids"], prompt["mask"], prompt["pixels"],
                                 prompt["grids"])
  cfg = ckpt.model.config
  # The sampler's default: vision placeholder tokens are never generated.
  suppress = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
              cfg.vision_end_token_id]
  config = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens,
                                         eos_token_id=special["eos"], pad_token_id=special["pad"],
                                         suppress_tokens=suppress)
  with torch.no_grad():
    out = ckpt.model.generate(**kwargs, generation_config=config)
  return out[:, prompt["ids"].shape[1]:].numpy()


def test_greedy_matches_hf_generate(ckpt, prompt, special, greedy):
  expected = hf_generate(ckpt, prompt, special, NEW_TOKENS)
  assert len(set(expected[1].tolist())) > 4  # a real sequence, not one token repeated
  # HF stops when every row has hit EOS; the sampler pads the remaining columns.
  expected = np.pad(expected, ((0, 0), (0, NEW_TOKENS - expected.shape[1])),
                    constant_values=special["pad"])
  # Rows 2i and 2i + 1 are the two samples of prompt i, decoded from one prefill.
  np.testing.assert_array_equal(greedy.tokens, np.repeat(expected, SAMPLES, axis=0))
  np.testing.assert_array_equal(greedy.logprobs, 0.0)  # a point mass
  assert greedy.tokens.shape == (2 * SAMPLES, NEW_TOKENS)


def test_buckets_and_new_weights_reuse_compiled_programs(model, sampler, prompt, greedy):
  programs = sampler.compiled_programs()
  # A batch of shorter prompts (62 tokens, was 79) with extra left padding: same bucket.
  shorter = dict(ids=np.pad(prompt["ids"][[0, 0]], ((0, 0), (3, 0)), constant_values=7),
                 mask=np.pad(prompt["mask"][[0, 0]], ((0, 0), (3, 0))),
                 pixels=np.concatenate([prompt["pixels"][:32]] * 2),
                 grids=prompt["grids"][[0, 0]])
  key = jax.random.key(0)
  with jax.transfer_guard("disallow"):  # no implicit host <-> device copy in a whole call
    out = sampler(shorter["ids"], shorter["mask"], key=key, num_samples=SAMPLES,
                  temperature=0.0, pixel_values=shorter["pixels"],
                  image_grid_thw=shorter["grids"])
  np.testing.assert_array_equal(out.tokens, greedy.tokens[[0, 0, 1, 1]])
  # New weights (as after an optimiser step) are an argument, not a constant.
  negated = nnx.clone(model)
  negated.lm_head.set_value(-model.lm_head[...])
  sampler.update_weights(negated)
  try:
    flipped = run(sampler, prompt, temperature=0.0)
  finally:
    sampler.update_weights(model)
  assert (flipped.tokens != greedy.tokens).any()
  assert sampler.compiled_programs() == programs
  # Compiled with this host's CPU options, which these HF-equal tokens ran under.
  assert sampler.compiler_options == {p: default_compiler_options("cpu", p) for p in PROGRAMS}
  assert sampler.compiler_options["prefill"] == cpt_jax.YNN_DOTS


def test_seeded_sampling_is_reproducible(sampler, prompt):
  a = run(sampler, prompt, key=1, **SAMPLING)
  b = run(sampler, prompt, key=1, **SAMPLING)
  c = run(sampler, prompt, key=2, **SAMPLING)
  programs = sampler.compiled_programs()
  # Other temperature / top-k / top-p values are traced arguments of the same programs.
  d = run(sampler, prompt, key=1, temperature=1.3, top_k=7, top_p=0.5)
  assert sampler.compiled_programs() == programs
  assert (d.tokens != a.tokens).any()
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).any()
  # The repeated rows of one prompt draw independently.
  assert (a.tokens[0] != a.tokens[1]).any()


def test_logprobs_equal_full_forward(model, sampler, prompt, special):
  out = run(sampler, prompt, key=3, **SAMPLING)
  rows = np.repeat(np.arange(2), SAMPLES)
  ids = np.concatenate([prompt["ids"][rows], out.tokens], axis=1)
  mask = np.concatenate([prompt["mask"][rows], out.mask], axis=1)
  pixels = np.concatenate([np.split(prompt["pixels"], [32])[r] for r in rows])
  grids = prompt["grids"][rows]
  # Vision placeholder tokens are suppressed (the tiny random model would sample them).
  vision_ids = [model.config.image_token_id, model.config.video_token_id,
                model.config.vision_start_token_id, model.config.vision_end_token_id]
  assert not np.isin(out.tokens, vision_ids).any()
  extra = prepare_inputs(model.config, ids, mask, grids)
  logits = nnx.jit(lambda m, *a: m(*a[:3], position_ids=a[3], vision_inputs=a[4]))(
      model, ids, mask, pixels, extra["position_ids"], extra["vision_inputs"])
  length = prompt["ids"].shape[1]
  # Token t of the response was drawn from the logits at position length - 1 + t.
  logits = np.asarray(logits, np.float64)[:, length - 1:length - 1 + NEW_TOKENS]
  log_pi = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  with np.errstate(divide="ignore"):  # log 0 = -inf outside the top-k / top-p set
    log_q = np.log(reference_distribution(logits, **SAMPLING, suppress=vision_ids))
  picked = lambda a: np.take_along_axis(a, out.tokens[..., None], axis=-1)[..., 0]
  real = out.mask.astype(bool)
  assert real.sum() > 2 * NEW_TOKENS
  np.testing.assert_allclose(out.policy_logprobs[real], picked(log_pi)[real], atol=2e-4)
  np.testing.assert_allclose(out.logprobs[real], picked(log_q)[real], atol=2e-4)
  np.testing.assert_array_equal(out.policy_logprobs[~real], 0.0)
  np.testing.assert_array_equal(out.tokens[~real], special["pad"])


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int | None,
                           top_p: float, suppress=()) -> np.ndarray:
  """softmax(logits / T) without the `suppress` tokens, restricted to the top-k, then to the
  smallest most-likely set of mass >= top_p, renormalised (float64 numpy, by sorting)."""
  z = np.asarray(logits, np.float64) / temperature
  z[..., list(suppress)] = -np.inf
  order = np.argsort(-z, axis=-1)
  ranks = np.argsort(order, axis=-1)
  keep = ranks < (top_k or z.shape[-1])
  z = np.where(keep, z, -np.inf)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  sorted_p = np.take_along_axis(p, order, axis=-1)
  mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p
  keep = np.take_along_axis(mass_before < top_p, ranks, axis=-1)
  p = np.where(keep, p, 0.0)
  return p / p.sum(-1, keepdims=True)


DRAWS = 8192


@pytest.fixture(scope="module")
def first_token_logits(ckpt):
  """A short text prompt and the HF model's logits for its next token (float64)."""
  ids = np.asarray([ckpt.tokenizer.encode("How many red spheres")], np.int32)
  return ids, hf_fixtures.hf_logits(ckpt, ids)[0, -1].astype(np.float64)


@pytest.fixture(scope="module")
def one_token_sampler(model, special):
  return Sampler(model, prompt_buckets=(16,), max_new_tokens=1, eos_ids=(),
                 pad_id=special["pad"], suppress_ids=())


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, 1.0), (0.5, None, 1.0), (1.0, None, 0.7), (1.0, 12, 1.0), (0.5, 30, 0.9)])
def test_first_token_distribution(one_token_sampler, first_token_logits, temperature, top_k,
                                  top_p):
  ids, logits = first_token_logits
  out = one_token_sampler(ids, np.ones_like(ids), key=jax.random.key(7), num_samples=DRAWS,
                          temperature=temperature, top_k=top_k, top_p=top_p)
  p = reference_distribution(logits[None], temperature, top_k, top_p)[0]
  counts = np.bincount(out.tokens[:, 0], minlength=p.size)
  assert counts[p == 0].sum() == 0, "drew a token outside the top-k / top-p set"
  np.testing.assert_allclose(out.logprobs[:, 0], np.log(p[out.tokens[:, 0]]), atol=2e-4)
  # E[TV] <= sum_i sqrt(p_i (1 - p_i) / N) / 2 (Jensen), and TV moves by at most 1/N per draw,
  # so P(TV > E + t) <= exp(-2 N t^2) (McDiarmid): t for a failure chance of 1e-6.
  tolerance = (0.5 * np.sqrt(p * (1 - p) / DRAWS).sum()
               + np.sqrt(np.log(1e6) / (2 * DRAWS)))
  tv = 0.5 * np.abs(counts / DRAWS - p).sum()
  assert tv < tolerance, (tv, tolerance)
  # The bound is tight enough to tell this setting from plain softmax sampling.
  plain = reference_distribution(logits[None], 1.0, None, 1.0)[0]
  if (temperature, top_k, top_p) != (1.0, None, 1.0):
    assert 0.5 * np.abs(plain - p).sum() > 2 * tolerance


def test_eos_stops_rows_independently(model, sampler, prompt, special, greedy):
  np.testing.assert_array_equal(greedy.done, False)  # the fixture's EOS never came
  reference = greedy.tokens[::SAMPLES]  # [2, N]
  # Two EOS ids whose first occurrences end the rows at different steps, both before the end.
  def first_eos(eos):
    return [int(np.flatnonzero(np.isin(row, eos))[0]) if np.isin(row, eos).any() else NEW_TOKENS
            for row in reference]
  tokens = np.unique(reference)
  pairs = [(a, b) for i, a in enumerate(tokens) for b in tokens[i + 1:]]
  eos = next(e for e in pairs if len(set(first_eos(e))) == 2 and min(first_eos(e)) >= 2
             and max(first_eos(e)) < NEW_TOKENS - 1)
  stops = first_eos(eos)
  stopping = Sampler(model, prompt_buckets=BUCKETS, max_new_tokens=NEW_TOKENS,
                     eos_ids=eos, pad_id=special["pad"])
  out = run(stopping, prompt, num_samples=1, temperature=0.0)
  assert out.tokens.shape == (2, NEW_TOKENS)
  for row, stop in enumerate(stops):
    np.testing.assert_array_equal(out.tokens[row, :stop + 1], reference[row, :stop + 1])
    np.testing.assert_array_equal(out.tokens[row, stop + 1:], special["pad"])
    np.testing.assert_array_equal(out.policy_logprobs[row, stop + 1:], 0.0)
  np.testing.assert_array_equal(out.lengths, np.asarray(stops) + 1)
  np.testing.assert_array_equal(out.done, True)
  # The loop ends once the last row is done, not after max_new_tokens.
  assert out.num_steps == max(stops) + 1 < NEW_TOKENS
  np.testing.assert_array_equal(greedy.lengths, NEW_TOKENS)
  # Checking for it every 3 steps (after the prefill's token: steps 1, 4, 7, ...) samples the
  # same rows and runs on to the next check.
  every3 = Sampler(model, prompt_buckets=BUCKETS, max_new_tokens=NEW_TOKENS, eos_ids=eos,
                   pad_id=special["pad"], done_check_every=3)
  late = run(every3, prompt, num_samples=1, temperature=0.0)
  for name in ("tokens", "lengths", "done"):
    np.testing.assert_array_equal(getattr(late, name), getattr(out, name))
  np.testing.assert_array_equal(late.policy_logprobs, out.policy_logprobs)
  assert late.num_steps == min(1 + 3 * -(-max(stops) // 3), NEW_TOKENS)


def test_auto_layout_decodes_from_column_blocks(model, sampler):
  """On CPU the default sampler (whose greedy tokens equal HF generate's above) decodes from
  the float32 column blocks of cpt_jax.kernels.blocked_matmul."""
  assert sampler.weight_layout == "blocks"
  d, h, hd = model.language_model.layers[0].self_attn.q_proj.kernel.shape
  assert sampler._params["language_model"]["layers"][0]["self_attn"]["q_proj"][
      "kernel"].shape == (-(-h * hd // 32), d, 32)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_weight_layouts_decode_the_same(model, sampler, prompt, special, greedy, layout):
  """XLA's dots on the model's own kernels ('in_out', the layout off CPU) and on a transposed
  copy ('out_in') decode the same tokens and log-probs as the column blocks, and
  update_weights re-lays out new weights."""
  other = Sampler(model, prompt_buckets=BUCKETS, max_new_tokens=NEW_TOKENS,
                  eos_ids=(special["eos"],), pad_id=special["pad"], weight_layout=layout)
  d, h, hd = model.language_model.layers[0].self_attn.q_proj.kernel.shape
  assert other._params["language_model"]["layers"][0]["self_attn"]["q_proj"][
      "kernel"].shape == {"in_out": (d, h, hd), "out_in": (h, hd, d)}[layout]
  np.testing.assert_array_equal(run(other, prompt, temperature=0.0).tokens, greedy.tokens)
  ours, theirs = run(other, prompt, key=3, **SAMPLING), run(sampler, prompt, key=3, **SAMPLING)
  np.testing.assert_array_equal(ours.tokens, theirs.tokens)
  np.testing.assert_allclose(ours.policy_logprobs, theirs.policy_logprobs, atol=1e-5)
  negated = nnx.clone(model)
  negated.lm_head.set_value(-model.lm_head[...])
  for s in (other, sampler):
    s.update_weights(negated)
  flipped = run(other, prompt, temperature=0.0)
  assert (flipped.tokens != greedy.tokens).any()
  np.testing.assert_array_equal(run(sampler, prompt, temperature=0.0).tokens, flipped.tokens)
  for s in (other, sampler):
    s.update_weights(nnx.state(model))  # a state, as the RFT trainer passes
  np.testing.assert_array_equal(run(other, prompt, temperature=0.0).tokens, greedy.tokens)
  np.testing.assert_array_equal(run(sampler, prompt, temperature=0.0).tokens, greedy.tokens)
  assert model.language_model.layers[0].self_attn.q_proj.kernel.shape == (d, h, hd)


def test_blocks_layout_needs_one_float32_cpu_device(model, special):
  kw = dict(prompt_buckets=BUCKETS, max_new_tokens=NEW_TOKENS, eos_ids=(special["eos"],),
            pad_id=special["pad"], weight_layout="blocks")
  mesh = sharding.make_mesh({"data": -1})
  with pytest.raises(ValueError, match="runs on one device; the mesh has 8"):
    Sampler(sharding.shard_model(nnx.clone(model), mesh, "data"), mesh=mesh, rules="data", **kw)
  half = nnx.clone(model)
  half.language_model.dtype = jax.numpy.bfloat16
  with pytest.raises(ValueError, match="computes in float32; the model computes in bfloat16"):
    Sampler(half, **kw)
  with pytest.raises(ValueError, match="weight_layout must be 'auto' or one of"):
    Sampler(model, **(kw | dict(weight_layout="columns")))


def test_cache_rooms_grow_by_even_steps():
  assert cache_rooms(1024, 128, 8) == (128, 256, 384, 512, 640, 768, 896, 1023)
  assert cache_rooms(4096, 128, 8) == (512, 1024, 1536, 2048, 2560, 3072, 3584, 4095)
  assert cache_rooms(64, 128, 8) == (63,)
  assert cache_rooms(NEW_TOKENS, 2, 8) == (2, 4, 6, 8, 10, 11)
  assert cache_rooms(NEW_TOKENS, 2, 3) == (4, 8, 11)
  assert cache_rooms(NEW_TOKENS, None, 8) == (11,)
  assert cache_rooms(1, 128, 8) == (0,)


def test_growing_cache_decodes_the_same(model, sampler, prompt, special, greedy):
  """A cache that starts with room for 4 new tokens and grows to 8 and 11 (three decode loops,
  each reading only its own cache size) gives the tokens and log-probs of one cache sized for
  the whole response, and stops every row at EOS the same way (the loops after do not run)."""
  assert sampler.cache_rooms == (NEW_TOKENS - 1,)
  growing = dict(prompt_buckets=BUCKETS, max_new_tokens=NEW_TOKENS, pad_id=special["pad"],
                 cache_growth=2, max_cache_sizes=3)
  sampling = Sampler(model, eos_ids=(special["eos"],), **growing)
  assert sampling.cache_rooms == (4, 8, 11)
  ours, theirs = run(sampling, prompt, key=5, **SAMPLING), run(sampler, prompt, key=5, **SAMPLING)
  np.testing.assert_array_equal(ours.tokens, theirs.tokens)
  np.testing.assert_allclose(ours.logprobs, theirs.logprobs, atol=1e-5)
  np.testing.assert_allclose(ours.policy_logprobs, theirs.policy_logprobs, atol=1e-5)
  # Greedy, with an EOS that the first prompt's row emits in the second cache size.
  eos = int(greedy.tokens[0, 5])
  out = run(Sampler(model, eos_ids=(eos,), **growing), prompt, num_samples=1, temperature=0.0)
  expected = greedy.tokens[::SAMPLES]
  first = [int(np.argmax(row == eos)) if (row == eos).any() else NEW_TOKENS for row in expected]
  lengths = np.minimum(np.asarray(first) + 1, NEW_TOKENS)
  np.testing.assert_array_equal(out.lengths, lengths)
  for row, length in enumerate(lengths):
    np.testing.assert_array_equal(out.tokens[row, :length], expected[row, :length])
    np.testing.assert_array_equal(out.tokens[row, length:], special["pad"])
  assert out.num_steps == max(lengths)
  with pytest.raises(ValueError, match="cache_growth must be >= 1"):
    Sampler(model, max_new_tokens=4, eos_ids=(), pad_id=0, cache_growth=0)
  with pytest.raises(ValueError, match="max_cache_sizes must be >= 1"):
    Sampler(model, max_new_tokens=4, eos_ids=(), pad_id=0, max_cache_sizes=0)


def test_greedy_picks_first_maximum_outside_suppressed_ids():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(5, 37)).astype(np.float32)
  logits[1, [4, 9, 30]] = 7.0  # ties: the first index wins, as numpy's argmax
  logits[2, :] = -np.inf
  logits[2, [11, 12]] = 0.5
  logits[3, 20] = 9.0  # the maximum is suppressed: the runner-up wins
  logits[4, :] = 2.0  # all equal
  suppress = (20, 36)
  tokens, logprobs, policy = sample_logits(
      jax.numpy.asarray(logits), jax.random.key(0), np.float32(0.0), np.int32(37),
      np.float32(1.0), SamplingMode(greedy=True), suppress)
  allowed = logits.copy()
  allowed[:, list(suppress)] = -np.inf
  expected = allowed.argmax(axis=-1)
  np.testing.assert_array_equal(tokens, expected)
  assert tokens[1] == 4 and tokens[2] == 11 and tokens[4] == 0
  np.testing.assert_array_equal(logprobs, 0.0)
  np.testing.assert_allclose(
      policy, scipy.special.log_softmax(logits, axis=-1)[np.arange(5), expected], rtol=1e-6)


def test_default_weight_layout():
  intel, amd = "GenuineIntel", "AuthenticAMD"
  big, small = 10 * OUT_IN_MIN_BYTES, OUT_IN_MIN_BYTES
  blocks = dict(float32=True, one_device=True, blocks=True)
  assert default_weight_layout("cpu", small, **blocks) == "blocks"
  assert default_weight_layout("cpu", big, avx512=True, vendor=intel, **blocks) == "blocks"
  for fallback in (dict(float32=False), dict(one_device=False), dict(blocks=False)):
    kw = blocks | fallback
    assert default_weight_layout("cpu", small + 1, avx512=True, vendor=intel, **kw) == "out_in"
    assert default_weight_layout("cpu", small, avx512=True, vendor=intel, **kw) == "in_out"
    assert default_weight_layout("cpu", big, avx512=False, vendor=intel, **kw) == "in_out"
    assert default_weight_layout("cpu", big, avx512=True, vendor=amd, **kw) == "in_out"
  assert default_weight_layout("tpu", big, avx512=True, vendor=intel, **blocks) == "in_out"
  assert default_weight_layout("gpu", big, **blocks) == "in_out"


def test_default_compiler_options_per_program():
  assert default_compiler_options("cpu", "prefill", avx512=False) == cpt_jax.YNN_DOTS
  assert default_compiler_options("cpu", "decode", avx512=True) == cpt_jax.YNN_DOTS
  assert default_compiler_options("cpu", "decode", avx512=False) == {}
  assert default_compiler_options("tpu", "prefill") == {}
  with pytest.raises(ValueError, match="program must be one of"):
    default_compiler_options("cpu", "train")


@pytest.mark.parametrize("weight_layout, cache_growth", [("in_out", None), ("out_in", 4)])
def test_sharded_greedy_equals_single_device(ckpt, prompt, special, greedy, weight_layout,
                                             cache_growth):
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  model = sharding.shard_model(load_pretrained(ckpt.path), mesh)
  assert len(model.lm_head[...].sharding.device_set) == 8
  sampler = Sampler(model, prompt_buckets=BUCKETS, max_new_tokens=NEW_TOKENS,
                    eos_ids=(special["eos"],), pad_id=special["pad"], mesh=mesh,
                    weight_layout=weight_layout, cache_growth=cache_growth)
  assert len(sampler._params["lm_head"][...].sharding.device_set) == 8
  # fsdp splits the rows: whether all are done is checked every few steps, not every step.
  assert sampler.done_check_every == SHARDED_DONE_CHECK_EVERY
  out = run(sampler, prompt, temperature=0.0)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  if cache_growth is None:
    return
  # An EOS that the first prompt's rows emit in the second cache size: each row stops there.
  eos = int(greedy.tokens[0, 5])
  stopping = Sampler(model, prompt_buckets=BUCKETS, max_new_tokens=NEW_TOKENS, eos_ids=(eos,),
                     pad_id=special["pad"], mesh=mesh, weight_layout=weight_layout,
                     cache_growth=cache_growth)
  out = run(stopping, prompt, temperature=0.0)
  first = [int(np.argmax(row == eos)) if (row == eos).any() else NEW_TOKENS
           for row in greedy.tokens]
  lengths = np.minimum(np.asarray(first) + 1, NEW_TOKENS)
  np.testing.assert_array_equal(out.lengths, lengths)
  for row, length in enumerate(lengths):
    np.testing.assert_array_equal(out.tokens[row, :length], greedy.tokens[row, :length])
    np.testing.assert_array_equal(out.tokens[row, length:], special["pad"])


def test_row_devices():
  assert row_devices(None) == 1
  assert row_devices(sharding.make_mesh({"fsdp": 2, "tensor": 4})) == 2
  assert row_devices(sharding.make_mesh({"data": 2, "fsdp": 4})) == 8
  assert row_devices(sharding.make_mesh({"tensor": -1})) == 1
  assert row_devices(sharding.make_mesh({"data": -1}), "data") == 8


def test_bad_inputs_are_reported(model, sampler, prompt):
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="exceeds the largest prompt bucket 192"):
    sampler(np.ones((1, 200), np.int32), np.ones((1, 200), np.int32), key=key)
  with pytest.raises(ValueError, match=r"prompt rows \[1\] have no real token"):
    sampler(np.ones((2, 4), np.int32), np.asarray([[1, 1, 1, 1], [0, 0, 0, 0]]), key=key)
  with pytest.raises(ValueError, match="must both be"):
    sampler(np.ones((2, 4), np.int32), np.ones((2, 5), np.int32), key=key)
  with pytest.raises(ValueError, match="top_p must be in"):
    sampler(prompt["ids"], prompt["mask"], key=key, top_p=0.0)
  with pytest.raises(ValueError, match="eos_ids"):
    Sampler(model, max_new_tokens=4, eos_ids=(10**6,), pad_id=0)
  with pytest.raises(ValueError, match="weight_layout must be"):
    Sampler(model, max_new_tokens=4, eos_ids=(), pad_id=0, weight_layout="transposed")
  with pytest.raises(ValueError, match="done_check_every must be >= 1"):
    Sampler(model, max_new_tokens=4, eos_ids=(), pad_id=0, done_check_every=0)
