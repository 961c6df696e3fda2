"""The SFT job: config -> mesh -> data -> model -> restore -> jitted step -> train loop.

    python -m cpt_jax.main --config=configs/sft_synthetic.py --workdir=/tmp/sft

Reads top to bottom; each section is a banner. Initialisation order: a checkpoint in
the workdir (resume) > `model.pretrained` (HF checkpoint directory) > random init.

Evaluation (per task and over all tasks of the test split):
  eval/<task>/accuracy, format: the papers' metric (eval.decode): a greedy response per
    test prompt, its answer extracted and matched after normalisation (cpt_jax.cl.evaluate).
  eval/<task>/exact_match, token_accuracy, nll: teacher-forced scores of the reference
    answer tokens (next-token argmax). Cheap, but not the papers' metric.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from cpt_jax import checkpoint as checkpoint_lib
from cpt_jax import models
from cpt_jax.models.qwen2_5_vl import params as qwen_params
from cpt_jax.models.qwen2_5_vl import vision
from cpt_jax import sharding
from cpt_jax import writer as writer_lib
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.cl import evaluate as evaluate_lib
from cpt_jax.rl.sampler import Sampler
from cpt_jax.train import optim, sft

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PRESETS = ("tiny", "3b", "7b")
PyTree = Any


def run(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns final metrics."""
  os.makedirs(workdir, exist_ok=True)
  compute_dtype = parse_dtype(config.compute_dtype)
  if config.steps_per_call < 1:
    raise ValueError(f"steps_per_call must be >= 1, got {config.steps_per_call}")

  # ---------------------------------------------------------------- mesh
  mesh, rules = sharding.mesh_from_config(config.mesh)
  logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.default_backend())

  # ---------------------------------------------------------------- tokenizer, data
  data_dir = config.data.dir or os.path.join(workdir, "data")
  if config.data.kind == "synthetic":
    from cpt_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    synthetic.build_synthetic(data_dir, config.data.tasks, **config.data.synthetic)
  train_sources = pipeline_lib.open_sources(data_dir, config.data.tasks, "train",
                                            config.data.kind)
  tokenizer = make_tokenizer(config, workdir, train_sources)
  model_config = make_model_config(config, tokenizer)
  if config.data.batch_size % jax.process_count():
    raise ValueError(f"data.batch_size {config.data.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  train_data = pipeline_lib.Pipeline(
      train_sources, tokenizer, _data_config(config, train=True), model_config=model_config)
  train_iter = iter(train_data)
  num_examples = sum(len(s.source) for s in train_sources)
  total_steps = config.total_steps or math.ceil(
      config.num_epochs * num_examples / config.data.batch_size)
  logging.info("%d training examples, batch %d: %d steps", num_examples,
               config.data.batch_size, total_steps)

  # ---------------------------------------------------------------- model and optimizer
  # Abstract first: a resumed run never builds (or loads) weights it then overwrites.
  graphdef, abstract_params, param_sh = abstract_model_params(lambda: models.Qwen2_5_VL(
      model_config, dtype=compute_dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(config.seed)),
      mesh, rules)
  optimizer = optim.make_optimizer(config.optim, abstract_params,
                                   max(1, total_steps // config.optim.grad_accum_steps))

  def init_state(params):
    return optim.create_train_state(params, optimizer, jax.random.PRNGKey(config.seed))
  abstract_state, state_sh = abstract_train_state(init_state, abstract_params, param_sh, mesh)

  # ---------------------------------------------------------------- restore or init
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=config.ckpt.keep,
                                     async_save=config.ckpt.async_save)
  restored = ckpt.restore_latest(abstract_state, data_iter=train_iter)
  if restored is not None:
    state, _ = restored
    logging.info("resumed at step %d", int(state.step))
  else:
    model = build_model(config, model_config, compute_dtype, mesh, rules)
    _, params = split_params(model)
    del model
    state = jax.jit(init_state, out_shardings=state_sh, donate_argnums=0)(params)
  step = int(state.step)

  # ---------------------------------------------------------------- steps
  step_kwargs = dict(compute_dtype=compute_dtype, remat_policy=config.remat_policy or None,
                     state_sharding=state_sh, loss_chunk=config.loss_chunk)
  train_step = sft.make_train_step(graphdef, optimizer, **step_kwargs)
  # config.steps_per_call steps as one program, for runs of that many equally shaped batches.
  multi_step = sft.make_train_step(graphdef, optimizer, steps_per_call=config.steps_per_call,
                                   **step_kwargs) if config.steps_per_call > 1 else None
  eval_step = sft.make_eval_step(graphdef, compute_dtype=compute_dtype,
                                 loss_chunk=config.loss_chunk)

  eval_sources = pipeline_lib.open_sources(data_dir, config.data.tasks, config.eval.split,
                                           config.data.kind)
  decode_eval = evaluate_lib.Evaluator(
      eval_sources, tokenizer, _data_config(config, train=False, product="prompt"),
      max_examples=config.eval.max_examples) if config.eval.decode else None
  samplers = []  # built on the first decode evaluation, then given new weights

  def evaluate(params) -> dict[str, float]:
    """Teacher-forced answer scores, and (eval.decode) the papers' accuracy: greedy decoding,
    answer extraction, normalised exact match (cpt_jax.cl.evaluate)."""
    eval_data = pipeline_lib.Pipeline(eval_sources, tokenizer, _data_config(config, train=False),
                                      model_config=model_config)
    scores, tasks, seen = [], [], 0
    for batch in eval_data:
      scores.append(eval_step(params, _device_batch([batch], mesh, rules)))
      # Task names as indices, so that every process can gather them like the scores.
      tasks.append(np.array([config.data.tasks.index(t) for t in batch["task"]], np.int32))
      seen += config.eval.batch_size
      if config.eval.max_examples and seen >= config.eval.max_examples:
        break
    if not scores:
      raise ValueError(f"eval split {config.eval.split!r} gave no full batch of "
                       f"{config.eval.batch_size}")
    scores, tasks = multihost_utils.process_allgather((scores, tasks), tiled=True)
    names = [np.asarray(config.data.tasks)[t] for t in tasks]
    metrics = {f"eval/{k}": v for k, v in sft.summarize_eval(scores, names).items()}
    if decode_eval is None:
      return metrics
    model = nnx.merge(graphdef, nnx.State(optim.cast_floating(params, compute_dtype)))
    if samplers:
      samplers[0].update_weights(model)
    else:
      samplers.append(Sampler(
          model, max_new_tokens=config.eval.max_new_tokens,
          eos_ids=tuple(model_config.eos_token_id), pad_id=tokenizer.pad_token_id,
          prompt_buckets=tuple(sorted(set(config.data.length_buckets) | {config.data.max_len})),
          mesh=mesh, rules=rules))
    results = decode_eval(evaluate_lib.sampler_generate(
        samplers[0], tokenizer, model_config, batch_size=config.eval.batch_size))
    for task, result in results.items():
      metrics[f"eval/{task}/accuracy"] = result.accuracy
      metrics[f"eval/{task}/format"] = result.format
    metrics["eval/all/accuracy"] = float(np.average(
        [r.accuracy for r in results.values()], weights=[r.num_examples for r in results.values()]))
    return metrics

  # ---------------------------------------------------------------- loop
  writer = writer_lib.MetricWriter(workdir, config=config, total_steps=total_steps,
                                   start_step=step)
  writer.log("training from step %d to %d", step, total_steps)
  # A call's metrics are read after the next call is queued, so the host never idles the
  # devices; step_time_s is the wall time between consecutive calls over their steps.
  pending, final, preempted = None, {}, False
  last_time = time.perf_counter()
  call_ends_every = [config.ckpt.every] + ([config.eval.every] if config.eval.every > 0 else [])
  with sharding.use_mesh(mesh, rules):
    while step < total_steps:
      host = [next(train_iter) for _ in range(
          steps_in_call(step, total_steps, config.steps_per_call, call_ends_every))]
      for step_fn, device_batch, n in step_calls(host, train_step, multi_step, mesh, rules):
        state, metrics = step_fn(state, device_batch)
        step += n
        if pending is not None:
          final = _report(writer, *pending, log_every=config.log_every)
        now = time.perf_counter()
        pending, last_time = (step, n, metrics, now - last_time), now

      preempted = ckpt.reached_preemption(step)
      save = preempted or step == total_steps or step % config.ckpt.every == 0
      if save:
        # Written before the checkpoint: a run resumed from it starts at the next step.
        final = _report(writer, *pending, log_every=config.log_every, write_last=True)
        pending = None
        ckpt.save(step, state, data_iter=train_iter, force=True,
                  metadata={"total_steps": total_steps,
                            "bad_examples": train_iter.counts.state()})
      if preempted:
        writer.log("preempted: saved step %d, stopping", step)
        break
      if config.eval.every > 0 and step % config.eval.every == 0 and step < total_steps:
        writer.write(step, evaluate(state.params))
    if not preempted and config.eval.every >= 0:
      final.update(evaluate(state.params))
      writer.write(step, {k: v for k, v in final.items() if k.startswith("eval/")})
  ckpt.wait()
  ckpt.close()
  writer.close()
  return {**final, "step": step, "preempted": preempted}


# ------------------------------------------------------------------ helpers


def _report(writer, last_step, n, metrics, seconds, *, log_every, write_last=False) -> dict:
  """Reads the metrics of the `n` steps up to `last_step` (waits for them; with n > 1 each has
  a leading axis of n) and writes those of every `log_every`-th step, of skipped steps and
  (write_last) of the last. Returns the last step's."""
  fetched = jax.device_get(metrics)
  for i in range(n):
    step = last_step - n + 1 + i
    values = {k: float(v[i] if n > 1 else v) for k, v in fetched.items()}
    values["step_time_s"] = seconds / n
    values["tokens_per_s"] = values["tokens"] * n / seconds if seconds > 0 else 0.0
    if values["skipped"]:
      writer.log("step %d: non-finite loss or gradient, update skipped (%d so far)", step,
                 int(values["skipped_total"]))
    if step % log_every == 0 or values["skipped"] or (write_last and step == last_step):
      writer.write(step, values)
  return values


def steps_in_call(step: int, total_steps: int, steps_per_call: int,
                  every: list[int]) -> int:
  """steps_per_call, or 1 where that many steps after `step` would pass `total_steps` or a
  multiple of one of `every` (checkpoint and evaluation periods): calls end at those steps."""
  stop = min([total_steps] + [(step // e + 1) * e for e in every])
  return steps_per_call if step + steps_per_call <= stop else 1


def step_calls(host: list[dict], one_step: Callable, multi_step: Callable | None, mesh,
               rules) -> list[tuple[Callable, dict, int]]:
  """(step function, device batch, steps) of each call that runs the host SFT batches in
  order: one call of `multi_step` over them all where there are several of the same shapes
  (it runs len(host) steps), else one call of `one_step` per batch (length buckets, image
  sizes)."""
  if len(host) > 1 and _same_shapes(host):
    return [(multi_step, _device_batch(host, mesh, rules), len(host))]
  return [(one_step, _device_batch([batch], mesh, rules), 1) for batch in host]


def _same_shapes(batches: list[dict]) -> bool:
  """Whether the host batches can be stacked into one call (same entries, same shapes)."""
  shapes = [jax.tree.map(np.shape, sft.device_batch(b)) for b in batches]
  return all(s == shapes[0] for s in shapes[1:])


def parse_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def _device_batch(batches: list[dict], mesh, rules) -> dict:
  """Host batches -> one global batch; several (of equal shapes) stacked on a new leading axis,
  one step each."""
  batches = [_global_indices(sft.device_batch(b)) for b in batches]
  if len(batches) == 1:
    return sharding.shard_batch(batches[0], mesh, rules=rules)
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
  dims = {k: sharding.DEFAULT_BATCH_DIMS.get(k, 0) for k in stacked}  # each step's example dim
  return sharding.shard_batch(stacked, mesh, rules=rules,
                              batch_dims={k: d if d is None else d + 1 for k, d in dims.items()})


def _global_indices(batch: dict) -> dict:
  if jax.process_count() > 1 and "vision_inputs" in batch:
    # Each process indexed its own patches from 0; in the global batch they follow those of
    # the processes before it.
    inputs = batch["vision_inputs"]
    sizes = multihost_utils.process_allgather(np.asarray(vision.vision_slots(inputs)))
    before = sizes[:jax.process_index()].sum(axis=0)
    batch["vision_inputs"] = vision.shift_vision_inputs(
        inputs, patches=before[0], window_slots=before[1], full_slots=before[2])
  return batch


def split_params(model) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, float32 params as a pure dict); only nnx.Param state is supported."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    others = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(rest)]
    raise ValueError(f"the trainers keep only nnx.Param variables; the model also has {others[:5]}")
  return graphdef, nnx.to_pure_dict(params)


def abstract_model_params(build: Callable[[], nnx.Module], mesh, rules
                          ) -> tuple[nnx.GraphDef, PyTree, PyTree]:
  """(graphdef, params as ShapeDtypeStructs carrying their shardings, the shardings) of the
  model `build()` makes, traced abstractly: no weight is created."""
  abstract_model = nnx.eval_shape(build)
  graphdef, abstract_params = split_params(abstract_model)
  param_sh = nnx.to_pure_dict(sharding.param_shardings(
      nnx.state(abstract_model, nnx.Param), mesh, rules))
  abstract_params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, param_sh)
  return graphdef, abstract_params, param_sh


def abstract_train_state(init_state: Callable, abstract_params: PyTree, param_sh: PyTree, mesh,
                         *args) -> tuple[PyTree, PyTree]:
  """(abstract TrainState carrying its shardings, the shardings) of
  `init_state(abstract_params, *args)`: params (and their optimiser moments) as `param_sh`,
  everything else replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.eval_shape(init_state, abstract_params, *args)
  state_sh = optim.state_shardings(abstract, param_sh, replicated)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sh)
  return abstract, state_sh


def _data_config(config, *, train: bool, product: str = "sft") -> pipeline_lib.DataConfig:
  d = config.data
  batch = d.batch_size if train else config.eval.batch_size
  return pipeline_lib.DataConfig(
      product=product, prompt_style="sft", batch_size=batch // jax.process_count(),
      max_len=d.max_len, length_buckets=tuple(d.length_buckets),
      seed=config.seed, shuffle=train,
      num_epochs=None if train else 1,  # training runs `total_steps`, across epochs
      drop_remainder=True,  # static shapes; eval scores the full batches only
      min_pixels=d.min_pixels, max_pixels=d.max_pixels,
      fixed_size=tuple(d.fixed_size) if d.fixed_size else None,
      num_workers=d.num_workers, on_bad_example=d.on_bad_example)


def make_tokenizer(config, workdir: str, train_sources):
  """The checkpoint's tokenizer, `tokenizer.path`, or one trained on the training texts
  (saved in the workdir so a resumed run reuses it)."""
  if config.model.pretrained:
    return tokenizer_lib.load_tokenizer(config.model.pretrained)
  if config.tokenizer.path:
    return tokenizer_lib.load_tokenizer(config.tokenizer.path)
  path = os.path.join(workdir, "tokenizer")
  if os.path.isdir(path):
    return tokenizer_lib.load_tokenizer(path)
  if jax.process_count() > 1:
    raise ValueError("set tokenizer.path on multi-process runs (a tokenizer trained by each "
                     "process would not be shared)")
  from cpt_jax.data import prompts  # pylint: disable=g-import-not-at-top
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  corpus = []
  for ts in train_sources:
    for i in range(min(len(ts.source), config.tokenizer.corpus_examples)):
      r = ts.source[i]
      options = [text(o) for o in r["options"]]
      corpus.append(prompts.prompt_text(text(r["task"]), text(r["question"]), options, "sft"))
      corpus.append(text(r["answer"]))
  corpus.append(tokenizer_lib.CHAT_TEMPLATE)
  return tokenizer_lib.train_tokenizer(path, corpus, config.tokenizer.vocab_size)


def make_model_config(config, tokenizer):
  """ModelConfig of the checkpoint (`model.pretrained`) or of a preset sized to the tokenizer."""
  m = config.model
  overrides = dict(remat=m.remat, attention_impl=m.attention_impl)
  if m.pretrained:
    return qwen_params.load_config(m.pretrained, **overrides)
  if m.preset not in PRESETS:
    raise ValueError(f"model.preset must be one of {PRESETS}, got {m.preset!r}")
  if m.preset != "tiny":
    preset = {"3b": models.ModelConfig.qwen2_5_vl_3b, "7b": models.ModelConfig.qwen2_5_vl_7b}
    return preset[m.preset](**overrides)
  ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
      ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
      ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
  return models.ModelConfig.tiny(
      vocab_size=len(tokenizer), eos_token_id=(tokenizer.eos_token_id,),
      pad_token_id=tokenizer.pad_token_id, **ids, **overrides)


def build_model(config, model_config, compute_dtype, mesh, rules):
  """The initial model, sharded: from `model.pretrained` (each tensor streamed straight to its
  sharding), or randomly initialised (on the host for the tiny preset, which skips a compile;
  else directly sharded on the devices)."""
  kwargs = dict(dtype=compute_dtype, param_dtype=jnp.float32)
  if config.model.pretrained:
    return models.load_pretrained(config.model.pretrained, remat=config.model.remat,
                                  attention_impl=config.model.attention_impl, mesh=mesh,
                                  rules=rules, **kwargs)
  if config.model.preset == "tiny":
    model = models.init_from_config(model_config, config.seed, **kwargs)
    return sharding.shard_model(model, mesh, rules)
  return sharding.shard_init(
      lambda: models.Qwen2_5_VL(model_config, rngs=nnx.Rngs(config.seed), **kwargs), mesh, rules)
