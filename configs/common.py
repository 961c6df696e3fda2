"""Pieces shared by the trainer configs (`get_config(arg)` files next to this one)."""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'runlocal,task=gqa' -> ConfigDict of `defaults` with those keys set.

  A bare key sets a bool to True; values take the type of their default (bools accept
  true/false/1/0). Unknown keys are an error naming them and the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if not eq:
        value = "true"
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r} is not a bool")
      out[key] = value.lower() in ("true", "1")
    elif not eq:
      raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
    else:
      out[key] = type(default)(value) if default is not None else value
  return out


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """`config.optim`; the fields are documented in cpt_jax/train/optim.py."""
  config = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-5, schedule="cosine", warmup_ratio=0.1,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.0,
      grad_clip_norm=1.0, grad_accum_steps=1, freeze=()))
  config.update(overrides)
  return config


def sft_config() -> ml_collections.ConfigDict:
  """The SFT job's fields with neutral defaults; experiment files set what they need."""
  from cpt_jax import sharding  # pylint: disable=g-import-not-at-top

  c = ml_collections.ConfigDict()
  c.job = "sft"
  c.seed = 0  # model init, data order, train-state rng
  c.data = dict(
      kind="synthetic",      # 'synthetic' (built into `dir` on first use) or 'real'
                             # (cpt_jax.data.builders)
      dir="",                # TFDS data_dir; '' -> <workdir>/data
      tasks=("scienceqa",),  # trained jointly (a union); one task per run in the continual setting
      synthetic=dict(train_size=3000, test_size=300, image_size=56, seed=0),
      batch_size=16,         # global, across processes
      max_len=1024,          # longer examples are skipped (and counted)
      length_buckets=(),     # pad to the smallest bucket that fits; each bucket compiles once
      min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
      fixed_size=(),         # (H, W): resize every image to it (static shapes)
      num_workers=0,         # preprocessing processes
      on_bad_example="skip",
  )
  c.tokenizer = dict(
      path="",               # '' -> model.pretrained's, else trained on the training texts
      vocab_size=512,        # for a trained tokenizer
      corpus_examples=2000,  # per task, for a trained tokenizer
  )
  c.model = dict(
      preset="tiny",         # 'tiny' | '3b' | '7b' (random init) unless `pretrained` is set
      pretrained="",         # local HF Qwen2.5-VL checkpoint directory (weights + tokenizer)
      remat="none",          # per-block rematerialisation: 'none' | 'full' | 'dots'
      attention_impl="xla",  # 'xla' | 'cudnn' (GPU)
  )
  c.compute_dtype = "float32"  # forward dtype; weights and optimizer state stay float32
  c.remat_policy = ""          # jax.checkpoint_policies name for the whole forward ('' off)
  c.loss_chunk = 0             # tokens per LM-head + loss chunk (bounds the [tokens, vocab] logits; 0: all)
  c.steps_per_call = 1          # SFT job: steps per compiled call (a scan over equally shaped
                               # batches; on CPU it saves the per-call temp-buffer allocation)
  c.num_epochs = 1.0
  c.total_steps = 0            # > 0 overrides num_epochs
  c.optim = optim_config()
  c.log_every = 10
  c.eval = dict(
      split="test",
      every=0,               # steps between evaluations (0: at the end only; -1: never)
      batch_size=16,
      max_examples=0,        # per task (decode) / in all (teacher-forced); 0: the whole split
      decode=True,           # also the papers' accuracy: greedy decode + answer extraction
      max_new_tokens=32,     # decode budget per answer
  )
  c.ckpt = dict(every=500, keep=3, async_save=True)
  c.mesh = sharding.mesh_config()
  return c
