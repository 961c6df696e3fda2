"""KV-cache decoding: greedy tokens equal HF generate; cached logits equal the full forward."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_fixtures
from cpt_jax.models import load_pretrained, prepare_inputs

NEW_TOKENS = 16
GRIDS = [(1, 4, 8), (1, 8, 4)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return hf_fixtures.checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def model(ckpt):
  return load_pretrained(ckpt.path)


@pytest.fixture(scope="module")
def prompt(ckpt, model):
  """A left-padded batch of two prompts with one image each (as the RFT sampler gets them)."""
  rows = [hf_fixtures.prompt_ids(ckpt, [GRIDS[0], "What color?"]),
          hf_fixtures.prompt_ids(ckpt, ["How many red spheres are there in the picture?",
                                        GRIDS[1]])]
  ids, mask = hf_fixtures.pad_batch(rows, pad_id=0, side="left")
  return dict(ids=ids, mask=mask, pixels=hf_fixtures.random_pixels(GRIDS),
              extra=prepare_inputs(model.config, ids, mask, np.asarray(GRIDS)))


def greedy(model, ids, mask, pixels, position_ids, vision_inputs, new_tokens):
  """Prefill, then `new_tokens` decode steps in a lax.fori_loop, all inside one jax.jit over the
  model state (as a sampler runs it). Returns tokens [B, N] and the logits each came from."""
  graphdef, state = nnx.split(model)
  batch, length = ids.shape

  @jax.jit
  def run(state, ids, mask, pixels, position_ids, vision_inputs):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(batch, length + new_tokens)
    logits, cache = model.prefill(ids, mask, cache, pixel_values=pixels,
                                  position_ids=position_ids, vision_inputs=vision_inputs)

    def step(i, carry):
      tokens, all_logits, logits, cache = carry
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
      tokens = tokens.at[:, i].set(token)
      all_logits = all_logits.at[:, i].set(logits)
      logits, cache = model.decode_step(token[:, None], cache)
      return tokens, all_logits, logits, cache

    tokens = jnp.zeros((batch, new_tokens), jnp.int32)
    all_logits = jnp.zeros((batch, new_tokens, logits.shape[-1]), jnp.float32)
    tokens, all_logits, _, _ = jax.lax.fori_loop(0, new_tokens, step,
                                                 (tokens, all_logits, logits, cache))
    return tokens, all_logits

  return run(state, ids, mask, pixels, position_ids, vision_inputs)


@pytest.fixture(scope="module")
def generated(model, prompt):
  tokens, logits = greedy(model, prompt["ids"], prompt["mask"], prompt["pixels"],
                          prompt["extra"]["position_ids"], prompt["extra"]["vision_inputs"],
                          NEW_TOKENS)
  return np.asarray(tokens), np.asarray(logits)


def test_greedy_decoding_matches_hf_generate(ckpt, prompt, generated):
  kwargs = hf_fixtures.hf_inputs(ckpt, prompt["ids"], prompt["mask"], prompt["pixels"], GRIDS)
  config = transformers.GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS,
                                         pad_token_id=0)
  with torch.no_grad():
    hf_tokens = ckpt.model.generate(**kwargs, generation_config=config)
  hf_tokens = hf_tokens[:, prompt["ids"].shape[1]:].numpy()
  assert hf_tokens.shape == (2, NEW_TOKENS)
  np.testing.assert_array_equal(generated[0], hf_tokens)
  assert len(set(hf_tokens[1].tolist())) > 4  # a real sequence, not one token repeated


def test_cached_logits_equal_full_forward(model, prompt, generated):
  tokens, cached_logits = generated
  ids = np.concatenate([prompt["ids"], tokens], axis=1)
  mask = np.concatenate([prompt["mask"], np.ones_like(tokens)], axis=1)
  extra = prepare_inputs(model.config, ids, mask, np.asarray(GRIDS))
  full = nnx.jit(lambda m, *a: m(*a[:3], position_ids=a[3], vision_inputs=a[4]))(
      model, ids, mask, prompt["pixels"], extra["position_ids"], extra["vision_inputs"])
  length = prompt["ids"].shape[1]
  # Token t of the continuation was chosen from the logits at position length - 1 + t.
  expected = np.asarray(full)[:, length - 1:length - 1 + NEW_TOKENS]
  np.testing.assert_allclose(cached_logits, expected, atol=1e-4, rtol=0)


def test_image_token_count_mismatch_is_reported(model):
  cfg = model.config
  grid = np.asarray([(1, 4, 8)])  # 32 patches -> 8 merged image features
  ids = np.asarray([[1, cfg.vision_start_token_id] + [cfg.image_token_id] * 7
                    + [cfg.vision_end_token_id, 2]])
  with pytest.raises(ValueError, match=r"7 image tokens, 8 image features"):
    model(ids, None, hf_fixtures.random_pixels(grid), grid)
  with pytest.raises(ValueError, match=r"7 <\|image_pad\|> tokens but no pixel_values"):
    model(ids)


def test_grown_cache_keeps_its_slots_and_appends_empty_ones(model):
  cache = model.init_cache(2, 5)
  k = tuple(jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(cache.k))
  v = tuple(jax.random.normal(jax.random.key(9 + i), x.shape) for i, x in enumerate(cache.v))
  cache = cache.replace(k=k, v=v, mask=jnp.ones((2, 5), jnp.int32), index=jnp.int32(5))
  grown = cache.grow(8)
  assert grown.max_len == 8 and int(grown.index) == 5
  np.testing.assert_array_equal(grown.mask, [[1] * 5 + [0] * 3] * 2)
  for old, new in zip(cache.k, grown.k):  # keys [B, K, D, T]
    np.testing.assert_array_equal(new[..., :5], old)
    np.testing.assert_array_equal(new[..., 5:], 0.0)
  for old, new in zip(cache.v, grown.v):  # values [B, K, T, D]
    np.testing.assert_array_equal(new[:, :, :5], old)
    np.testing.assert_array_equal(new[:, :, 5:], 0.0)
  assert cache.grow(5) is cache
  with pytest.raises(ValueError, match="cannot shrink a KV cache of 5 slots to 4"):
    cache.grow(4)


def test_forked_cache_decodes_like_copies_of_the_prompt(model, prompt):
  """Three rows per prompt read the prompt's slots as one shared prefix; with a different token
  fed to each row, their logits equal those of a cache holding three copies of the prompt."""
  graphdef, state = nnx.split(model)
  batch, length = prompt["ids"].shape
  n, steps = 3, 4
  feed = jax.random.randint(jax.random.key(0), (batch * n, steps), 3, 200)

  @jax.jit
  def run(state):
    model = nnx.merge(graphdef, state)
    _, cache = model.prefill(prompt["ids"], prompt["mask"], model.init_cache(batch, length),
                             pixel_values=prompt["pixels"],
                             position_ids=prompt["extra"]["position_ids"],
                             vision_inputs=prompt["extra"]["vision_inputs"])
    rep = lambda x: jnp.repeat(x, n, axis=0)
    copied = cache.replace(k=tuple(map(rep, cache.k)), v=tuple(map(rep, cache.v)),
                           mask=rep(cache.mask), positions=rep(cache.positions))
    caches, out = [cache.fork(n, steps), copied.grow(length + steps)], []
    for cache in caches:
      logits = []
      for t in range(steps):
        step_logits, cache = model.decode_step(feed[:, t:t + 1], cache)
        logits.append(step_logits)
      out.append((jnp.stack(logits, 1), cache))
    return out

  (forked_logits, forked), (copied_logits, copied) = run(state)
  assert forked.max_len == steps and int(forked.index) == steps
  assert forked.k[0].shape[0] == batch * n and forked.prefix.k[0].shape[0] == batch
  np.testing.assert_array_equal(forked.positions, copied.positions)
  assert len(set(np.asarray(forked_logits).argmax(-1)[:n, -1].tolist())) > 1  # rows differ
  np.testing.assert_allclose(forked_logits, copied_logits, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="already has a shared prefix"):
    forked.fork(2, 4)
