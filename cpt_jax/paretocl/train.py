"""Class-incremental training and evaluation: experience replay (ER) and ParetoCL.

`run(config, workdir)` reads the benchmark, then for each task: trains `config.train.epochs`
passes over the task's stream (1: online, 5: offline) with a reservoir replay buffer, and
evaluates every task. It writes one line per task to `tasks.jsonl` and, at the end, the
continual post-training report (cl.report: report.md, accuracy_matrix.csv, plots) and
`report.json` (its fields plus accuracy matrix, Acc, AAA, forgetting; for ParetoCL also
ParetoCL-- and the alpha sweep) into workdir, and returns the report.

Per step (both methods): a replay batch is sampled from the buffer, one backbone pass runs
on stream + replay images, the method's loss is minimised with SGD (gradient clipping),
then the stream batch is offered to the reservoir. Both losses use the same scale: ER's is
the mean over the concatenated stream + replay batch (mammoth's convention), which equals
ParetoCL's loss at the preference (0.5, 0.5).

Evaluation is class-incremental: after task j, predictions (and ParetoCL's entropies) range
over the classes of tasks 0..j only, as mammoth evaluates class-IL.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from cpt_jax.cl import metrics as cl_metrics
from cpt_jax.cl import report as report_lib
from cpt_jax.paretocl import buffer as replay_buffer
from cpt_jax.paretocl import data as cl_data
from cpt_jax.paretocl import hypernet, losses, resnet

# XLA's RngBitGenerator compiles several times faster than threefry on CPU, which dominates
# the start-up of small runs (every initializer shape is a compile).
RNG_IMPL = "rbg"

# ----------------------------------------------------------------------------------------
# Model and methods.
# ----------------------------------------------------------------------------------------


class ContinualClassifier(nnx.Module):
  """Backbone features h(x) and a head: a plain linear layer (ER) or a HyperHead (ParetoCL)."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int, *, rngs: nnx.Rngs):
    self.backbone = resnet.ResNet(
        nf=config.model.nf, blocks_per_stage=config.model.blocks_per_stage, rngs=rngs)
    self.head = METHODS[config.method].make_head(
        config, self.backbone.num_features, num_classes, rngs)
    self.num_classes = num_classes


@dataclasses.dataclass(frozen=True)
class Method:
  """How a method builds its head, trains it, and predicts at test time."""
  make_head: Callable[..., nnx.Module]
  # (head, config, features_new, features_replay, stream, replay, rng) -> (loss, aux)
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  # (head, config, features, class_mask, rng) -> {prediction name: predictions [..., B]};
  # class_mask [C] marks the classes seen so far, the only ones a prediction may choose.
  predict: Callable[..., dict[str, jax.Array]]


def _er_head(config, num_features, num_classes, rngs):
  del config
  return nnx.Linear(num_features, num_classes, rngs=rngs)


def _er_loss(head, config, features_new, features_replay, stream, replay, rng):
  del config, rng
  return losses.er_loss(head(features_new), stream["labels"], stream["valid"],
                        head(features_replay), replay["labels"], replay["valid"])


def _er_predict(head, config, features, class_mask, rng):
  del config, rng
  return {"pred": jnp.argmax(mask_unseen_classes(head(features), class_mask), axis=-1)}


def _paretocl_head(config, num_features, num_classes, rngs):
  return hypernet.HyperHead(num_features, num_classes, hidden=config.paretocl.hidden,
                            num_hidden_layers=config.paretocl.num_hidden_layers, rngs=rngs)


def _paretocl_loss(head, config, features_new, features_replay, stream, replay, rng):
  alphas = hypernet.sample_preferences(rng, config.paretocl.train_preferences,
                                       concentration=config.paretocl.concentration)  # [K, 2]
  return losses.paretocl_loss(alphas, head(features_new, alphas), stream["labels"],
                              stream["valid"], head(features_replay, alphas), replay["labels"],
                              replay["valid"])


def _paretocl_predict(head, config, features, class_mask, rng):
  """ParetoCL (min-entropy over K sampled preferences), ParetoCL-- (fixed) and the sweep.

  Softmax, entropy and argmax run over the seen classes only (class_mask).
  """
  cfg = config.paretocl
  sampled = hypernet.sample_preferences(rng, cfg.test_preferences, concentration=cfg.concentration)
  fixed = jnp.array([[1.0 - cfg.fixed_alpha_new, cfg.fixed_alpha_new]])
  alphas = jnp.concatenate([sampled, fixed, hypernet.preference_sweep(cfg.sweep_points)])
  logits = mask_unseen_classes(head(features, alphas), class_mask)  # [K + 1 + S, B, C]
  k = cfg.test_preferences
  pred, _ = hypernet.min_entropy_select(logits[:k])
  all_preds = jnp.argmax(logits, axis=-1)
  return {"pred": pred, "pred_fixed": all_preds[k], "pred_sweep": all_preds[k + 1:]}


# Logit given to classes not trained yet at evaluation (finite, so that p log p = 0).
_UNSEEN_LOGIT = -1e9


def mask_unseen_classes(logits: jax.Array, class_mask: jax.Array) -> jax.Array:
  """Class-incremental evaluation: classes not trained yet get (numerically) zero probability.

  logits [..., C], class_mask [C] bool.
  """
  return jnp.where(class_mask, logits, _UNSEEN_LOGIT)


METHODS: dict[str, Method] = {
    "er": Method(_er_head, _er_loss, _er_predict),
    "paretocl": Method(_paretocl_head, _paretocl_loss, _paretocl_predict),
}

# ----------------------------------------------------------------------------------------
# Input processing (on device, inside the jitted steps).
# ----------------------------------------------------------------------------------------


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """uint8 [B, H, W, C] -> float32, per-channel standardised."""
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def augment(rng: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop of the zero-padded image and random horizontal flip, per example."""
  b, h, w, c = images.shape
  k_y, k_x, k_flip = jax.random.split(rng, 3)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offset_y = jax.random.randint(k_y, (b,), 0, 2 * pad + 1)
  offset_x = jax.random.randint(k_x, (b,), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c)))(
      padded, offset_y, offset_x)
  flip = jax.random.bernoulli(k_flip, 0.5, (b,))
  return jnp.where(flip[:, None, None, None], crop[:, :, ::-1], crop)


# ----------------------------------------------------------------------------------------
# Jitted steps.
# ----------------------------------------------------------------------------------------


def make_train_step(graphdef, config: ml_collections.ConfigDict, mean, std):
  """(state, stream, replay, rng) -> (state, metrics); the state (model + optimizer) is donated."""
  method = METHODS[config.method]

  def train_step(state, stream, replay, rng):
    model, optimizer = nnx.merge(graphdef, state)
    k_aug_new, k_aug_replay, k_loss = jax.random.split(rng, 3)
    # Replay rows that do not exist yet (empty buffer) reuse stream images with zero loss
    # weight, so BatchNorm statistics only ever see real images.
    replay_images = jnp.where(replay["valid"][:, None, None, None], replay["images"],
                              stream["images"])
    new_images = stream["images"]
    if config.train.augment:
      new_images = augment(k_aug_new, new_images)
      replay_images = augment(k_aug_replay, replay_images)
    images = normalize(jnp.concatenate([new_images, replay_images]), mean, std)  # [2B, H, W, C]
    num_new = new_images.shape[0]

    def loss_fn(model):
      features = model.backbone(images, train=True)  # [2B, F]: one pass for both batches
      return method.loss(model.head, config, features[:num_new], features[num_new:], stream,
                         replay, k_loss)

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "grad_norm_head": optax.tree.norm(grads.head), **aux}
    return nnx.state((model, optimizer)), metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef, config: ml_collections.ConfigDict, mean, std):
  """(state, images [B, H, W, C] uint8, num_seen_classes [] int32, rng) -> {prediction name:
  [..., B]} (running BN stats); classes >= num_seen_classes are never predicted."""
  method = METHODS[config.method]

  def eval_step(state, images, num_seen_classes, rng):
    model, _ = nnx.merge(graphdef, state)
    features = model.backbone(normalize(images, mean, std), train=False)
    class_mask = jnp.arange(model.num_classes) < num_seen_classes  # [C]
    return method.predict(model.head, config, features, class_mask, rng)

  return jax.jit(eval_step)


def summarize(acc: np.ndarray) -> dict:
  """Acc, AAA, forgetting and BWT (cpt_jax.cl.metrics) of a [T, T] accuracy matrix in percent."""
  return {"acc_matrix": acc.tolist(), "acc": cl_metrics.avg_acc(acc),
          "aaa": cl_metrics.average_anytime_accuracy(acc), "forgetting": cl_metrics.forgetting(acc),
          "bwt": cl_metrics.backward_transfer(acc), "final_task_accuracies": acc[-1].tolist()}


# ----------------------------------------------------------------------------------------
# Loop.
# ----------------------------------------------------------------------------------------


def _stream_batches(task: cl_data.TaskSplit, task_id: int, batch_size: int,
                    rng: np.random.Generator):
  """One shuffled pass; the last batch is padded (valid=False) to keep shapes static."""
  order = rng.permutation(len(task.labels))
  for start in range(0, len(order), batch_size):
    index = order[start:start + batch_size]
    valid = np.ones(batch_size, bool)
    valid[len(index):] = False
    index = np.resize(index, batch_size)  # pads by repeating real examples
    yield {"images": task.images[index], "labels": task.labels[index],
           "task_ids": np.full(batch_size, task_id, np.int32), "valid": valid}


def _evaluate(eval_step, state, task: cl_data.TaskSplit, batch_size: int, num_seen_classes: int,
              rng: jax.Array) -> dict[str, np.ndarray]:
  """Correct-prediction indicators per prediction name, over the task's test set.

  The same rng for every batch: ParetoCL draws one set of test preferences per evaluation.
  """
  num_seen_classes = np.int32(num_seen_classes)
  correct: dict[str, list[np.ndarray]] = {}
  n = len(task.labels)
  for start in range(0, n, batch_size):
    index = np.resize(np.arange(start, min(start + batch_size, n)), batch_size)
    preds = jax.device_get(eval_step(state, task.images[index], num_seen_classes, rng))
    count = min(batch_size, n - start)
    for name, pred in preds.items():
      correct.setdefault(name, []).append(pred[..., :count] == task.labels[start:start + count])
  return {name: np.concatenate(parts, axis=-1) for name, parts in correct.items()}


def _mean_std(config: ml_collections.ConfigDict, benchmark: cl_data.ClassIncrementalBenchmark):
  if config.data.mean is not None and config.data.std is not None:
    return np.asarray(config.data.mean, np.float32), np.asarray(config.data.std, np.float32)
  pixels = np.concatenate([t.images.reshape(-1, t.images.shape[-1]) for t in benchmark.train])
  pixels = pixels.astype(np.float32) / 255.0
  return pixels.mean(axis=0), pixels.std(axis=0)


def validate_config(config: ml_collections.ConfigDict) -> None:
  if config.method not in METHODS:
    raise ValueError(f"method must be one of {sorted(METHODS)}, got {config.method!r}")
  if config.train.replay_batch_size > config.buffer.size:
    raise ValueError(f"replay_batch_size {config.train.replay_batch_size} exceeds buffer size "
                     f"{config.buffer.size}")
  if config.train.replay_batch_size != config.train.batch_size:
    # Replay rows missing from an empty buffer are filled with stream rows.
    raise ValueError(f"replay_batch_size {config.train.replay_batch_size} must equal batch_size "
                     f"{config.train.batch_size}")
  if config.train.epochs < 1:
    raise ValueError(f"train.epochs must be >= 1, got {config.train.epochs}")


@dataclasses.dataclass
class _Trainer:
  """The jitted functions of one run and the state they thread through the stream."""
  config: ml_collections.ConfigDict
  train_step: Callable
  eval_step: Callable
  buffer_add: Callable
  buffer_sample: Callable
  state: nnx.State
  buffer: replay_buffer.ReservoirBuffer
  rng: jax.Array
  host_rng: np.random.Generator
  step: int = 0

  def train_task(self, task: cl_data.TaskSplit, task_id: int) -> dict[str, float]:
    """config.train.epochs passes over the task's stream; returns mean step metrics."""
    train = self.config.train
    sums, count = None, 0
    for epoch in range(train.epochs):
      for stream in _stream_batches(task, task_id, train.batch_size, self.host_rng):
        k_sample, k_step, k_add = jax.random.split(jax.random.fold_in(self.rng, self.step), 3)
        replay = self.buffer_sample(self.buffer, k_sample, train.replay_batch_size)
        replay = jax.device_put(replay, jax.devices()[0])  # no-op unless the buffer is on host
        self.state, metrics = self.train_step(self.state, stream, replay, k_step)
        self.buffer = self.buffer_add(self.buffer, stream["images"], stream["labels"],
                                      stream["task_ids"], k_add, stream["valid"])
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        count += 1
        self.step += 1
        if self.step % self.config.log_every_steps == 0:
          logging.info("task %d epoch %d step %d: %s", task_id, epoch, self.step,
                       {k: round(float(v), 4) for k, v in metrics.items()})
    return {k: float(v) / count for k, v in jax.device_get(sums).items()}

  def accuracies(self, tests: list[cl_data.TaskSplit], num_seen_classes: int, rng: jax.Array
                 ) -> dict[str, np.ndarray]:
    """Accuracy (%) per prediction name on every task's test set: [..., T].

    Predictions range over the num_seen_classes classes trained so far (class-IL), so
    future tasks score 0.
    """
    correct = [_evaluate(self.eval_step, self.state, test, self.config.eval_batch_size,
                         num_seen_classes, rng) for test in tests]
    return {name: np.stack([100.0 * c[name].mean(axis=-1) for c in correct], axis=-1)
            for name in correct[0]}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates one class-incremental run; writes tasks.jsonl and report.json."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  benchmark = cl_data.load_benchmark(config.data)
  mean, std = _mean_std(config, benchmark)
  logging.info("%s: %d tasks x %d classes, train sizes %s", config.data.name, benchmark.num_tasks,
               benchmark.classes_per_task, [len(t.labels) for t in benchmark.train])

  # Model and optimizer; SGD without momentum, as in the paper's reproduction.
  model = ContinualClassifier(config, benchmark.num_classes,
                              rngs=nnx.Rngs(jax.random.key(config.seed, impl=RNG_IMPL)))
  tx = optax.chain(optax.clip_by_global_norm(config.train.grad_clip),
                   optax.sgd(config.train.learning_rate))
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  del model  # the jitted steps own the state from here on
  buffer = replay_buffer.place_buffer(
      replay_buffer.init_buffer(config.buffer.size, benchmark.image_shape), config.buffer.storage)
  trainer = _Trainer(
      config=config, train_step=make_train_step(graphdef, config, mean, std),
      eval_step=make_eval_step(graphdef, config, mean, std),
      buffer_add=jax.jit(replay_buffer.add, donate_argnums=0),
      buffer_sample=jax.jit(replay_buffer.sample, static_argnums=2), state=state, buffer=buffer,
      rng=jax.random.key(config.seed, impl=RNG_IMPL), host_rng=np.random.default_rng(config.seed))

  num_tasks = benchmark.num_tasks
  acc = {}  # prediction name -> accuracy matrix [T, (S,) T] in percent
  sweep_old_new = []  # after each task j >= 1: [S, 2] (old-task mean, new-task) accuracy
  train_seconds = 0.0
  with open(os.path.join(workdir, "tasks.jsonl"), "w") as tasks_log:
    for task_id in range(num_tasks):
      start_time = time.time()
      losses = trainer.train_task(benchmark.train[task_id], task_id)
      train_seconds += time.time() - start_time
      # Every task is evaluated (future ones too, so the matrix is full).
      eval_rng = jax.random.fold_in(jax.random.key(config.seed + 1, impl=RNG_IMPL), task_id)
      num_seen_classes = (task_id + 1) * benchmark.classes_per_task
      for name, row in trainer.accuracies(benchmark.test, num_seen_classes, eval_rng).items():
        acc.setdefault(name, np.zeros((num_tasks, *row.shape)))[task_id] = row
      record = {"task": task_id, "train_metrics": losses,
                "accuracies": acc["pred"][task_id].tolist(),
                "seen_tasks_mean": float(np.mean(acc["pred"][task_id, :task_id + 1]))}
      if "pred_sweep" in acc and task_id > 0:
        sweep = acc["pred_sweep"][task_id]  # [S, T]
        old_new = np.stack([sweep[:, :task_id].mean(axis=1), sweep[:, task_id]], axis=-1)
        sweep_old_new.append(old_new.tolist())
        record["sweep_old_new"] = old_new.tolist()
      tasks_log.write(json.dumps(record) + "\n")
      tasks_log.flush()
      logging.info("after task %d: %s", task_id, record)

  classic = {"method": config.method, "setting": config.setting, "seed": config.seed,
             "dataset": config.data.name, "num_tasks": num_tasks,
             "classes_per_task": benchmark.classes_per_task, "buffer_size": config.buffer.size,
             "steps": trainer.step, "train_seconds_incl_compile": train_seconds,
             **summarize(acc["pred"])}
  if config.method == "paretocl":
    classic["paretocl_minus"] = summarize(acc["pred_fixed"])
    sweep_alphas = np.asarray(hypernet.preference_sweep(config.paretocl.sweep_points))
    classic["sweep"] = {
        "alpha_new": sweep_alphas[:, 1].tolist(),
        "old_new_after_task": sweep_old_new}  # [T - 1][S][2]
  # The continual post-training report files (report.md, accuracy_matrix.csv, plots), then
  # report.json with this benchmark's fields added.
  report = report_lib.write_report(workdir, method=config.method, matrix=acc["pred"],
                                   task_names=[f"task_{i}" for i in range(num_tasks)])
  report.update(classic)
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report
