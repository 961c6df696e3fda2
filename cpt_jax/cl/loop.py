"""The continual post-training loop (job 'cpt'): train a task sequence one task at a time,
evaluate every task after each, and report the accuracy matrix a[j][i] (papers.md, part A).

    python -m cpt_jax.main --config=configs/cpt/qwen2_5_vl_7b.py:method=rft,ckpt=DIR \\
        --config.data.dir=/data/tfds --workdir=gs://bucket/cpt/rft
    python -m cpt_jax.main --config=configs/cpt/paretocl_qwen2_5_vl_7b.py:ckpt=DIR \\
        --config.data.dir=/data/tfds --workdir=gs://bucket/cpt/paretocl
    python -m cpt_jax.demo --workdir=/tmp/demo     # the embedded default, SFT vs RFT on CPU

Methods (`config.method`, registry `METHODS`):
  sft         per task: supervised fine-tuning on the answer tokens (`train.sft` step);
  rft         per task: GRPO (`train.rft.GRPOTrainer`, `rl.rollout`);
  rif_rft     rft after offline RIF-RFT (drop the instances the model gets 0 of n right);
  rft_no_kl   rft without the KL term; rft_no_cot: direct-answer prompt, reward = accuracy;
  multitask   SFT on the union of all tasks in one stage (the upper bound). Its accuracy
              matrix has T identical rows (the one model has seen every task at every stage),
              so its FM and BWT are 0 by construction and AvgAcc is what it is compared on;
  paretocl    per task: ParetoCL (papers.md, part B, "ParetoCL in continual post-training";
              `paretocl.vlm`): the model wrapped with a preference-conditioned low-rank
              LM-head update, trained on mean_k [a_replay L_replay + a_new L_new] over the new
              task and a replay buffer of the earlier tasks; evaluated with a per-prompt
              min-entropy preference (see `train_paretocl_stage` and `paretocl_generate`).

Each stage starts from the previous stage's final weights, with a fresh optimiser and learning
rate schedule. Before the first stage the starting model is evaluated (the zero-shot row and
'general before'); after every stage the matrix row is recorded and the report rewritten
(`cl.report.write_report`, partial matrices included; `report_every_stage=False`: at the end).
Evaluation decodes every test prompt (greedy by default) and grades it with the papers' answer
extraction (`cl.evaluate`); the RFT stages' step metrics (within-group reward variance, gradient
norm) feed the report's variance plot.

Workdir:
  progress.json           the loop's resume state: zero-shot row, one row per finished stage
  tokenizer/              trained on the first run unless tokenizer.path / init.workdir has one
  stages/<j>_<name>/      checkpoints/ (Orbax: TrainState, data iterator), metrics.jsonl,
                          tensorboard/, rif_offline.json (rif_rft)
  evals/<j>_<name>.json   per-stage evaluation details (accuracy, format, shown responses)
  evals/<j>_<name>.preferences.json   (paretocl) per task: how often each test-time
                          preference was chosen, and the mean chosen alpha_new
  report.json, accuracy_matrix.csv, report.md, *.png   (cl.report)
A killed run restarts inside the stage it was on, from that stage's latest checkpoint (state,
data position, RNG); finished stages are never redone. Runs are deterministic (greedy
evaluation, rollout keys from the checkpointed RNG), so a resumed run ends with the same
numbers as an uninterrupted one. A workdir refuses a config whose method, tasks or results-
relevant sections (`SETTINGS`) differ from the run it holds.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from cpt_jax import checkpoint as checkpoint_lib
from cpt_jax import models
from cpt_jax import sharding
from cpt_jax import writer as writer_lib
from cpt_jax.cl import evaluate as evaluate_lib
from cpt_jax.cl import report as report_lib
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.paretocl import vlm
from cpt_jax.rl import filtering, rollout
from cpt_jax.rl.sampler import Sampler
from cpt_jax.train import loop as sft_loop
from cpt_jax.train import optim, rft, sft

PyTree = Any
# Jitted programs (samplers, SFT steps, GRPO trainers) by everything they depend on, shared by
# the stages of a run and by runs in one process (the demo's SFT and RFT runs, tests): equal
# stages compile once. `clear_programs()` drops them.
_PROGRAMS: dict[tuple, Any] = {}
PROGRESS_FILE = "progress.json"
RIF_FILE = "rif_offline.json"
JOINT_STAGE = "multitask"
# on_step(stage_index, step): called after every training step (and its checkpoint, if any).
StepHook = Callable[[int, int], None]


# ------------------------------------------------------------------ methods


@dataclasses.dataclass(frozen=True)
class Method:
  """How a method trains: `trainer` (a key of TRAINERS), one joint stage or one per task, and
  config overrides (dotted paths) applied on top of the run's config."""
  trainer: str
  joint: bool = False
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


METHODS: dict[str, Method] = {}


def register_method(name: str, method: Method) -> None:
  if name in METHODS:
    raise ValueError(f"method {name!r} is already registered")
  METHODS[name] = method


register_method("sft", Method("sft"))
register_method("multitask", Method("sft", joint=True))
register_method("rft", Method("rft"))
register_method("rif_rft", Method("rft", overrides={"rft.rif.mode": "offline"}))
register_method("rft_no_kl", Method("rft", overrides={"rft.rl.use_kl": False}))
register_method("rft_no_cot", Method("rft", overrides={"rft.prompt_style": "rft_no_cot",
                                                        "rft.rl.reward": "no_cot"}))
register_method("paretocl", Method("paretocl"))


def resolve_method(config) -> tuple[Method, Any]:
  """(Method, config with the method's overrides applied)."""
  if config.method not in METHODS:
    raise ValueError(f"unknown method {config.method!r}; registered: {sorted(METHODS)}")
  method = METHODS[config.method]
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for path, value in method.overrides.items():
      *parents, leaf = path.split(".")
      node = config
      for name in parents:
        node = node[name]
      node[leaf] = value
  return method, config


# ------------------------------------------------------------------ progress (resume state)


@dataclasses.dataclass
class Progress:
  """What the loop has finished: the zero-shot row and one evaluation row per stage
  (task -> accuracy, general sets included)."""
  method: str
  tasks: list[str]
  general: list[str]
  stages: list[str]
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the rows depend on
  zero_shot: dict[str, float] | None = None
  rows: list[dict[str, float]] = dataclasses.field(default_factory=list)

  @classmethod
  def load_or_new(cls, workdir: str, **fields) -> Progress:
    path = os.path.join(workdir, PROGRESS_FILE)
    if not os.path.exists(path):
      return cls(**fields)
    with open(path) as f:
      saved = cls(**json.load(f))
    for key, value in fields.items():
      if key == "settings":
        changed = sorted(k for k in set(value) | set(saved.settings)
                         if value.get(k) != saved.settings.get(k))
        if changed:
          raise ValueError(f"{workdir} holds a run whose config differs in {changed}; use "
                           "another workdir")
      elif getattr(saved, key) != value:
        raise ValueError(f"{workdir} holds a run with {key}={getattr(saved, key)}, but the config "
                         f"asks for {value}; use another workdir")
    return saved

  def save(self, workdir: str) -> None:
    path = os.path.join(workdir, PROGRESS_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=2)
    os.replace(path + ".tmp", path)

  def matrix(self, joint: bool) -> np.ndarray:
    """[T, T] accuracy matrix, NaN rows for stages not finished."""
    a = np.full((len(self.tasks), len(self.tasks)), np.nan)
    rows = self.rows * len(self.tasks) if joint else self.rows
    for j, row in enumerate(rows):
      a[j] = [row[t] for t in self.tasks]
    return a


# Config sections a run's results depend on; a resumed run must not change them (`paretocl`
# where the config has it).
SETTINGS = ("seed", "data", "model", "init", "compute_dtype", "sft", "rft", "eval", "paretocl")


def _settings(config) -> dict[str, Any]:
  out = {}
  for key in SETTINGS:
    if key not in config:
      continue
    value = config[key]
    out[key] = json.loads(value.to_json()) if hasattr(value, "to_json") else value
  out["data"].pop("num_workers")  # how fast, not what
  out["sft"].pop("steps_per_call", None)
  out["eval"].pop("zero_shot")
  return out


def checkpoints_of(run_dir: str) -> str:
  """The checkpoint directory holding the final weights of a run directory: `<dir>/checkpoints`
  (SFT and RFT jobs) or the last finished stage's (a 'cpt' run)."""
  direct = os.path.join(run_dir, "checkpoints")
  if os.path.isdir(direct):
    return direct
  path = os.path.join(run_dir, PROGRESS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      progress = Progress(**json.load(f))
    if progress.rows:
      j = len(progress.rows) - 1
      return os.path.join(run_dir, "stages", _stage_dir_name(j, progress.stages[j]),
                          "checkpoints")
  raise FileNotFoundError(f"{run_dir} has no checkpoints/ and no finished 'cpt' stage")


def clear_programs() -> None:
  """Forgets the compiled programs (and the weights their samplers hold)."""
  _PROGRAMS.clear()


def _stage_dir_name(index: int, name: str) -> str:
  return f"{index}_{name}"


class Preempted(Exception):
  """SIGTERM (or the preemption service) asked the run to stop; the stage is checkpointed."""


# ------------------------------------------------------------------ shared run state


@dataclasses.dataclass
class Setup:
  """Everything the stages share: mesh, data, tokenizer, model structure, compiled programs."""
  config: Any
  workdir: str
  mesh: Any
  rules: Any
  data_dir: str
  tokenizer: Any
  model_config: Any
  graphdef: Any
  abstract_params: PyTree  # ShapeDtypeStructs with shardings
  param_shardings: PyTree
  compute_dtype: Any
  on_step: StepHook | None = None
  opened: dict = dataclasses.field(default_factory=dict)  # (task, split) -> TaskSource
  # Method 'paretocl': the model is a `vlm.ParetoVLM` (params 'base/...', 'adapter/...');
  # base_graphdef is the plain Qwen2.5-VL inside it.
  paretocl: Any = None  # config.paretocl
  base_graphdef: Any = None

  def program_key(self, kind: str, *parts) -> tuple:
    """Cache key of a jitted program: everything its compilation depends on."""
    # A ParetoVLM's graphdef does not hash (its hypernet keeps a dict of output shapes); the
    # plain model's graphdef and the adapter's sizes determine it.
    model = self.graphdef if self.paretocl is None else (
        self.base_graphdef, "paretocl", self.paretocl.rank, self.paretocl.hyper_hidden)
    return (kind, model, self.model_config, self.mesh, self.rules, self.compute_dtype,
            self.config.remat_policy, self.config.loss_chunk, *parts)

  def sources(self, tasks: Sequence[str], split: str) -> list[pipeline_lib.TaskSource]:
    """The splits of `tasks` (opened once per run; training splits cut to data.train_examples)."""
    for task in tasks:
      if (task, split) not in self.opened:
        self.opened[task, split] = pipeline_lib.open_sources(
            self.data_dir, [task], split, self.config.data.kind)[0]
    out = [self.opened[task, split] for task in tasks]
    limit = self.config.data.train_examples if split == "train" else 0
    if limit:
      out = [dataclasses.replace(s, source=evaluate_lib.Head(s.source, limit)) for s in out]
    return out

  def data_config(self, *, product: str, prompt_style: str, batch_size: int,
                  train: bool) -> pipeline_lib.DataConfig:
    d = self.config.data
    return pipeline_lib.DataConfig(
        product=product, prompt_style=prompt_style, batch_size=batch_size, max_len=d.max_len,
        length_buckets=tuple(d.length_buckets), seed=self.config.seed, shuffle=train,
        num_epochs=None if train else 1, drop_remainder=train,
        min_pixels=d.min_pixels, max_pixels=d.max_pixels,
        fixed_size=tuple(d.fixed_size) if d.fixed_size else None,
        num_workers=d.num_workers, on_bad_example=d.on_bad_example)

  def model(self, params: PyTree) -> nnx.Module:
    return nnx.merge(self.graphdef, nnx.State(optim.cast_floating(params, self.compute_dtype)))

  def sampler(self, max_new_tokens: int, params: PyTree) -> Sampler:
    """A sampler for `max_new_tokens`, set to `params` (shared by evaluation and rollouts)."""
    return self.sampler_of(max_new_tokens, self.model(params))

  def sampler_of(self, max_new_tokens: int, model: models.Qwen2_5_VL) -> Sampler:
    """A sampler for `max_new_tokens`, set to the weights of `model` (a Qwen2_5_VL whose
    structure follows from this run's: the run's model, or a ParetoVLM folded to one
    preference). Its KV cache grows by `config.rft.rl.cache_growth` slots at a time."""
    buckets = tuple(sorted(set(self.config.data.length_buckets) | {self.config.data.max_len}))
    pad_id = self.tokenizer.pad_token_id
    growth = self.config.rft.rl.cache_growth or None
    key = self.program_key("sampler", max_new_tokens, buckets, pad_id, growth)
    if key in _PROGRAMS:
      _PROGRAMS[key].update_weights(model)
    else:
      _PROGRAMS[key] = Sampler(
          model, max_new_tokens=max_new_tokens,
          eos_ids=tuple(self.model_config.eos_token_id), pad_id=pad_id, prompt_buckets=buckets,
          mesh=self.mesh, rules=self.rules, cache_growth=growth)
    return _PROGRAMS[key]

  def stage_rng(self, stage: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(self.config.seed), stage)


def _setup(config, workdir: str, on_step: StepHook | None, method: Method) -> Setup:
  """Mesh, data, tokenizer and the abstract model (no weights yet)."""
  compute_dtype = sft_loop.parse_dtype(config.compute_dtype)
  devices = jax.devices()[:config.num_devices] if config.num_devices else None
  mesh, rules = sharding.mesh_from_config(config.mesh, devices)
  logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.default_backend())

  data_dir = config.data.dir or os.path.join(workdir, "data")
  if config.data.kind == "synthetic":
    from cpt_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    synthetic.build_synthetic(data_dir, (*config.tasks, *config.general),
                              **config.data.synthetic)
  if config.init.workdir and not config.tokenizer.path and os.path.isdir(
      os.path.join(config.init.workdir, "tokenizer")):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.tokenizer.path = os.path.join(config.init.workdir, "tokenizer")
  train_sources = pipeline_lib.open_sources(data_dir, config.tasks, "train", config.data.kind)
  tokenizer = sft_loop.make_tokenizer(config, workdir,
                                      templated(train_sources, config.data.answer_template))
  model_config = sft_loop.make_model_config(config, tokenizer)

  def base_model():
    return models.Qwen2_5_VL(model_config, dtype=compute_dtype, param_dtype=jnp.float32,
                             rngs=nnx.Rngs(config.seed))
  paretocl = config.paretocl if method.trainer == "paretocl" else None
  base_graphdef = None
  if paretocl is None:
    graphdef, abstract_params, param_sh = sft_loop.abstract_model_params(base_model, mesh, rules)
  else:
    graphdef, abstract_params, param_sh = sft_loop.abstract_model_params(
        lambda: vlm.build(base_model(), paretocl, seed=config.seed), mesh, rules)
    base_graphdef = sft_loop.split_params(nnx.eval_shape(base_model))[0]
  return Setup(config=config, workdir=workdir, mesh=mesh, rules=rules, data_dir=data_dir,
               tokenizer=tokenizer, model_config=model_config, graphdef=graphdef,
               abstract_params=abstract_params, param_shardings=param_sh,
               compute_dtype=compute_dtype, on_step=on_step, paretocl=paretocl,
               base_graphdef=base_graphdef)


def _initial_params(setup: Setup) -> PyTree:
  """The weights the first stage starts from: `init.workdir` > model.pretrained > random.
  A ParetoVLM (method 'paretocl') wraps those base weights with a fresh adapter (its B is
  zero: the starting model's outputs are the base model's); `init.workdir` then holds a plain
  model's run (SFT, RFT or 'cpt' of another method)."""
  config = setup.config
  wrapped = setup.paretocl is not None
  if config.init.workdir:
    params = checkpoint_lib.restore_params(
        checkpoints_of(config.init.workdir),
        setup.abstract_params["base"] if wrapped else setup.abstract_params)
    if not wrapped:
      return params
    base = nnx.merge(setup.base_graphdef, nnx.State(params))
  else:
    base = sft_loop.build_model(config, setup.model_config, setup.compute_dtype, setup.mesh,
                                setup.rules)
    if not wrapped:
      return sft_loop.split_params(base)[1]
  model = vlm.build(base, setup.paretocl, seed=config.seed)
  # The adapter is created on one device; its arrays go to their (replicated) shardings.
  return jax.device_put(sft_loop.split_params(model)[1], setup.param_shardings)


# ------------------------------------------------------------------ evaluation


def _eval_prompt_style(config, method: Method) -> str:
  if config.eval.prompt_style:
    return config.eval.prompt_style
  return config.rft.prompt_style if method.trainer == "rft" else "sft"


def evaluate_params(setup: Setup, params: PyTree, prompt_style: str, *,
                    preferences: dict | None = None) -> dict[str, evaluate_lib.TaskResult]:
  """Decoded accuracy of `params` on every task of the sequence and every general set
  (a ParetoVLM: `paretocl_evaluate`, its preference choices recorded in `preferences`)."""
  config = setup.config
  splits = dict(config.eval.split_per_task)
  sources = [source for task in (*config.tasks, *config.general)
             for source in setup.sources([task], splits.get(task, config.eval.split))]
  evaluator = evaluate_lib.Evaluator(
      sources, setup.tokenizer,
      setup.data_config(product="prompt", prompt_style=prompt_style,
                        batch_size=config.eval.batch_size, train=False),
      max_examples=config.eval.max_examples)
  if setup.paretocl is not None:
    return paretocl_evaluate(setup, params, evaluator,
                             preferences if preferences is not None else {})
  sampler = setup.sampler(config.eval.max_new_tokens, params)
  return evaluator(_sampler_generate(setup, sampler))


def _sampler_generate(setup: Setup, sampler: Sampler) -> evaluate_lib.Generate:
  config = setup.config
  return evaluate_lib.sampler_generate(
      sampler, setup.tokenizer, setup.model_config, batch_size=config.eval.batch_size,
      temperature=config.eval.temperature, key=jax.random.PRNGKey(config.seed + 2))


def _write_eval(workdir: str, name: str, results: Mapping[str, evaluate_lib.TaskResult],
                preferences: Mapping[str, Any] | None = None) -> None:
  os.makedirs(os.path.join(workdir, "evals"), exist_ok=True)
  files = {f"{name}.json": {k: v.to_dict() for k, v in results.items()}}
  if preferences:
    files[f"{name}.preferences.json"] = preferences
  for file_name, content in files.items():
    path = os.path.join(workdir, "evals", file_name)
    with open(path + ".tmp", "w") as f:
      json.dump(content, f, indent=2)
    os.replace(path + ".tmp", path)


def paretocl_evaluate(setup: Setup, params: PyTree, evaluator: evaluate_lib.Evaluator,
                      preferences: dict) -> dict[str, evaluate_lib.TaskResult]:
  """Greedy (or eval.temperature) decoding of a ParetoVLM with a preference per prompt.

  Per prompt batch: the min-entropy choice among `paretocl.eval_preferences` fixed preferences
  (`vlm.make_prompt_select_step`: the entropy of the first answer token's distribution after
  the prompt), then, for each distinct chosen preference, the ParetoVLM folded at it
  (`vlm.fold_preference`: a plain model whose LM head includes the update) decodes the whole
  batch in the shared sampler and the rows that chose it keep their responses. The sampler
  takes one head for all rows, so a batch costs one decode per distinct choice in it (at most
  min(K, batch)); `preferences` receives per task how often each preference was chosen, the
  mean chosen alpha_new and each prompt's choice (id -> index into 'alphas'), and the decodes
  per batch.
  """
  config, p = setup.config, setup.paretocl
  key = setup.program_key("paretocl_select", p.eval_preferences, p.eval_seed)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = vlm.make_prompt_select_step(
        setup.graphdef, num_preferences=p.eval_preferences, seed=p.eval_seed,
        compute_dtype=setup.compute_dtype)
  select = _PROGRAMS[key]
  alphas = np.asarray(vlm.inference_preferences(p.eval_preferences, p.eval_seed))  # [K, 2]
  model = setup.model(params)
  folded = vlm.fold_preference(model, alphas[0])  # its LM head is reset per preference below
  sampler = setup.sampler_of(config.eval.max_new_tokens, folded)
  generate = _sampler_generate(setup, sampler)
  counts: dict[str, np.ndarray] = {}
  choices: dict[str, dict[str, int]] = {}
  decodes = []

  def paretocl_generate(batch: Mapping[str, Any]) -> list[str]:
    batch = {k: v for k, v in batch.items() if k not in rollout.DERIVED_KEYS}
    padded, real = rollout.pad_rows(batch, config.eval.batch_size, setup.model_config)
    chosen = np.asarray(select(params, _prompt_device_batch(setup, padded))["chosen"])[:real]
    responses = [""] * real
    groups = np.unique(chosen)
    for g in groups:
      folded.lm_head.set_value(vlm.folded_lm_head(model, alphas[g]))
      sampler.update_weights(folded)
      decoded = generate(padded)
      for i in np.flatnonzero(chosen == g):
        responses[i] = decoded[i]
    for task, ident, g in zip(batch["task"], batch["id"], chosen):
      counts.setdefault(str(task), np.zeros(len(alphas), np.int64))[g] += 1
      choices.setdefault(str(task), {})[str(ident)] = int(g)
    decodes.append(len(groups))
    return responses

  results = evaluator(paretocl_generate)
  for task, c in counts.items():
    preferences[task] = {"chosen_counts": c.tolist(),
                         "mean_alpha_new": float(c @ alphas[:, 1] / c.sum()),
                         "chosen": choices[task]}
  preferences["alphas"] = alphas.tolist()
  preferences["decodes_per_batch"] = float(np.mean(decodes))
  _print(f"ParetoCL evaluation: {np.mean(decodes):.1f} decodes per batch; mean chosen alpha_new "
         + ", ".join(f"{t} {preferences[t]['mean_alpha_new']:.2f}" for t in counts))
  return results


def _prompt_device_batch(setup: Setup, batch: Mapping[str, Any]) -> dict:
  """The model inputs of a (left-padded) prompt batch, placed on the mesh."""
  grid = np.asarray(batch.get("image_grid_thw", np.zeros((0, 3), np.int32))).reshape(-1, 3)
  prepared = models.prepare_inputs(setup.model_config, batch["prompt_ids"], batch["prompt_mask"],
                                   grid if len(grid) else None)
  out = {"input_ids": batch["prompt_ids"], "attention_mask": batch["prompt_mask"],
         "position_ids": prepared["position_ids"].astype(np.int32)}
  if len(grid):
    out["pixel_values"] = batch["pixel_values"]
    out["vision_inputs"] = prepared["vision_inputs"]
  return sharding.shard_batch(out, setup.mesh, rules=setup.rules)


# ------------------------------------------------------------------ SFT stage


class _AnswerTemplate:
  """Records with the answer rewritten as `template`, where '{answer}' marks the answer: the
  response SFT trains on ('<think> </think> \\boxed{{answer}}' turns '3' into
  '<think> </think> \\boxed{3}')."""

  def __init__(self, source: Any, template: str):
    self.source = source
    self.template = template

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> Any:
    record = dict(self.source[index])
    answer = record["answer"]
    answer = answer.decode() if isinstance(answer, bytes) else str(answer)
    record["answer"] = self.template.replace("{answer}", answer).encode()
    return record


def templated(sources: Sequence[pipeline_lib.TaskSource],
              template: str) -> list[pipeline_lib.TaskSource]:
  """`sources` with their answers written as `template` (the response format SFT trains on)."""
  if template == "{answer}":
    return list(sources)
  if "{answer}" not in template:
    raise ValueError(f"data.answer_template {template!r} has no '{{answer}}'")
  return [dataclasses.replace(ts, source=_AnswerTemplate(ts.source, template)) for ts in sources]


def _stage_epochs(section, name: str) -> float:
  per_task = dict(section.epochs_per_task)
  return float(per_task.get(name, section.epochs))


def _sft_sources(setup: Setup, tasks: Sequence[str]) -> list[pipeline_lib.TaskSource]:
  """The training splits of `tasks` with the answers SFT trains on (data.answer_template)."""
  return templated(setup.sources(tasks, "train"), setup.config.data.answer_template)


def train_sft_stage(setup: Setup, params: PyTree, tasks: Sequence[str], stage: int,
                    stage_dir: str, epochs: float) -> PyTree:
  """Supervised fine-tuning of `params` on the union of `tasks`; resumes from `stage_dir`."""
  config = setup.config
  s = config.sft
  sources = _sft_sources(setup, tasks)
  data = pipeline_lib.Pipeline(
      sources, setup.tokenizer, setup.data_config(product="sft", prompt_style="sft",
                                                  batch_size=s.batch_size, train=True),
      model_config=setup.model_config)
  data_iter = iter(data)
  num_examples = sum(len(ts.source) for ts in sources)
  total_steps = s.total_steps or max(1, math.ceil(epochs * num_examples / s.batch_size))

  key = setup.program_key("sft", s.optim.to_json(), total_steps)
  if key not in _PROGRAMS:
    optimizer = optim.make_optimizer(s.optim, setup.abstract_params,
                                     max(1, total_steps // s.optim.grad_accum_steps))
    abstract_state, state_sh, init = _state_programs(setup, optimizer)
    # make_step(steps_per_call=k): the step program, or k steps as one; each compiled once.
    make_step = functools.cache(functools.partial(
        sft.make_train_step, setup.graphdef, optimizer, compute_dtype=setup.compute_dtype,
        remat_policy=config.remat_policy or None, state_sharding=state_sh,
        loss_chunk=config.loss_chunk))
    _PROGRAMS[key] = (abstract_state, init, make_step)
  abstract_state, init, make_step = _PROGRAMS[key]
  steps_per_call = s.steps_per_call
  step_fn = make_step()
  multi_fn = make_step(steps_per_call=steps_per_call) if steps_per_call > 1 else None

  def train(state, ckpt, writer):
    step = int(state.step)
    while step < total_steps:
      first = step + 1
      host = [next(data_iter) for _ in range(
          sft_loop.steps_in_call(step, total_steps, steps_per_call, [config.ckpt.every]))]
      for fn, batch, n in sft_loop.step_calls(host, step_fn, multi_fn, setup.mesh, setup.rules):
        state, metrics = fn(state, batch)
        logged = [i for i in range(n) if (step + 1 + i) % config.log_every == 0
                  or step + 1 + i == total_steps]
        if logged:
          metrics = jax.device_get(metrics)
          for i in logged:
            writer.write(step + 1 + i, metrics if n == 1 else {k: v[i] for k, v in metrics.items()})
        step += n
      # After all the batches taken from data_iter: a checkpoint holds its position.
      _maybe_save(ckpt, step, total_steps, state, data_iter, config)
      if setup.on_step is not None:
        for done in range(first, step + 1):
          setup.on_step(stage, done)
    return state

  return _run_stage(setup, params, stage, stage_dir, abstract_state, init, data_iter,
                    total_steps, train,
                    f"SFT on {'+'.join(tasks)}: {num_examples} examples, {total_steps} steps")


# ------------------------------------------------------------------ RFT stage


def grpo_config(config):
  """GRPOConfig of `config.rft` (same fields as the RFT job's `config.rl`)."""
  view = config.rft.copy_and_resolve_references()
  with view.unlocked():
    view.data = dict(max_len=config.data.max_len)
  return rft.grpo_config(view)


def train_rft_stage(setup: Setup, params: PyTree, tasks: Sequence[str], stage: int,
                    stage_dir: str, epochs: float) -> PyTree:
  """GRPO on `tasks` from `params` (also the KL reference); resumes from `stage_dir`."""
  config = setup.config
  r = config.rft
  cfg = grpo_config(config)
  rif_mode = filtering.FilterMode.parse(r.rif.mode)
  sources = setup.sources(tasks, "train")
  sampler = setup.sampler(cfg.max_response_length, params)
  pad_id = setup.tokenizer.pad_token_id

  def prompts(srcs, *, batch_size, train):
    return pipeline_lib.Pipeline(srcs, setup.tokenizer, setup.data_config(
        product="prompt", prompt_style=r.prompt_style, batch_size=batch_size, train=train))

  def sample(batch, key, **kw):
    return rollout.sample_groups(sampler, batch, key=key, cfg=cfg, tokenizer=setup.tokenizer,
                                 top_k=r.rl.top_k or None, **kw)

  # ---------------------------------------------------------------- offline RIF-RFT
  rif_stats: dict[str, Any] = {}
  if rif_mode == filtering.FilterMode.OFFLINE:
    # A key stream apart from the iterations' (fold_in(rng, iteration)).
    key = jax.random.fold_in(setup.stage_rng(stage), 2**31 - 1)
    sources, rif_stats = rollout.offline_rif_sources(
        os.path.join(stage_dir, RIF_FILE), sources, lambda: rollout.offline_filter(
            lambda batch: sample(batch, key),
            prompts(sources, batch_size=cfg.rollout_batch_size, train=False),
            batch_size=cfg.rollout_batch_size, model_config=setup.model_config,
            drop_all_wrong=r.rif.drop_all_wrong, drop_all_right=r.rif.drop_all_right))
    logging.info("offline RIF-RFT kept %d of %d instances", rif_stats["num_kept"],
                 rif_stats["num_instances"])

  num_examples = sum(len(ts.source) for ts in sources)
  num_iterations = r.num_iterations or max(1, math.ceil(epochs * num_examples
                                                        / cfg.rollout_batch_size))
  micro_steps = (cfg.rollout_batch_size // cfg.update_batch_size * cfg.ppo_epochs
                 * r.optim.grad_accum_steps)
  optimizer_steps = max(1, num_iterations * micro_steps // r.optim.grad_accum_steps)
  data_iter = iter(prompts(sources, batch_size=cfg.rollout_batch_size, train=True))

  key = setup.program_key("rft", r.optim.to_json(), optimizer_steps, cfg, r.rl.old_logprobs,
                          pad_id, id(sampler))
  if key not in _PROGRAMS:
    optimizer = optim.make_optimizer(r.optim, setup.abstract_params, optimizer_steps)
    abstract_state, state_sh, init = _state_programs(setup, optimizer)
    # A placeholder reference: the stage's own is set below (the trainer only reads it).
    trainer = rft.GRPOTrainer(
        setup.graphdef, optimizer, cfg, setup.model_config,
        reference_params=params if cfg.kl_enabled else None, sampler=sampler,
        old_logprobs=r.rl.old_logprobs, compute_dtype=setup.compute_dtype,
        remat_policy=config.remat_policy or None, mesh=setup.mesh, rules=setup.rules,
        state_sharding=state_sh, pad_id=pad_id, loss_chunk=config.loss_chunk)
    _PROGRAMS[key] = (abstract_state, init, trainer)
  abstract_state, init, trainer = _PROGRAMS[key]
  # The KL anchor is the weights this stage starts from (copied: the state takes `params`).
  trainer.reference_params = _copy(params) if cfg.kl_enabled else None

  def train(state, ckpt, writer):
    iteration = int(ckpt.latest_step() or 0)
    if rif_stats and iteration == 0:
      writer.write(0, {f"rif/{k}": v for k, v in rif_stats.items()
                       if isinstance(v, (int, float))})
    trainer.sync_rollout(state.params)
    while iteration < num_iterations:
      state, metrics = trainer.iterate(
          state, iteration, lambda: next(data_iter), sample, filter_mode=rif_mode.value,
          low=r.rif.low, high=r.rif.high, max_batches=r.rif.max_batches or None)
      iteration += 1
      if iteration % config.log_every == 0 or iteration == num_iterations:
        writer.write(iteration, metrics)
      _maybe_save(ckpt, iteration, num_iterations, state, data_iter, config)
      if setup.on_step is not None:
        setup.on_step(stage, iteration)
    return state

  try:
    return _run_stage(setup, params, stage, stage_dir, abstract_state, init, data_iter,
                      num_iterations, train,
                      f"RFT on {'+'.join(tasks)}: {num_examples} prompts, {num_iterations} "
                      f"iterations of {cfg.rollout_batch_size} x {cfg.n} rollouts")
  finally:
    trainer.reference_params = None  # the cached trainer must not keep this stage's weights


# ------------------------------------------------------------------ ParetoCL stage


PARETOCL_FIELDS = ("rank", "hyper_hidden", "num_preferences", "concentration", "eval_preferences",
                   "eval_seed", "replay_batch_size", "replay_examples_per_task", "optim")


def check_paretocl_config(config) -> None:
  """ValueError naming what is missing or out of range in `config.paretocl`."""
  if "paretocl" not in config:
    raise ValueError("method 'paretocl' needs a config.paretocl section with fields "
                     f"{list(PARETOCL_FIELDS)} (configs/cpt/paretocl_qwen2_5_vl_7b.py)")
  p = config.paretocl
  missing = [f for f in PARETOCL_FIELDS if f not in p]
  if missing:
    raise ValueError(f"config.paretocl lacks {missing}")
  for name in ("rank", "hyper_hidden", "num_preferences", "eval_preferences",
               "replay_batch_size"):
    if not isinstance(p[name], int) or p[name] < 1:
      raise ValueError(f"config.paretocl.{name} must be an integer >= 1, got {p[name]!r}")
  if not p.concentration > 0:
    raise ValueError(f"config.paretocl.concentration must be > 0, got {p.concentration!r}")
  if not isinstance(p.replay_examples_per_task, int) or p.replay_examples_per_task < 0:
    raise ValueError("config.paretocl.replay_examples_per_task must be an integer >= 0 (0: every "
                     f"training example), got {p.replay_examples_per_task!r}")


def train_paretocl_stage(setup: Setup, params: PyTree, tasks: Sequence[str], stage: int,
                         stage_dir: str, epochs: float) -> PyTree:
  """ParetoCL on `tasks` (the stage's task) from `params` (a ParetoVLM's); resumes from
  `stage_dir`.

  Each step's batch holds sft.batch_size rows of the new task and paretocl.replay_batch_size
  rows of the replay buffer: the earlier tasks of the sequence, each cut to a fixed, seeded
  subset of paretocl.replay_examples_per_task training examples (0: all), mixed into every
  batch in that proportion by the data pipeline (`DataConfig.replay_fraction`, per example).
  Rows are marked new or replay by their task. The step (`vlm.make_train_step`) draws
  paretocl.num_preferences alphas and minimises mean_k [a_replay L_replay + a_new L_new].
  The first task has nothing to replay: its batches (same size, so one compiled step serves
  every stage) are all new rows and the loss is mean_k a_new L_new (L_replay is 0), i.e. SFT
  on the task at a random per-step scale of mean 1/2. Steps: sft.total_steps, else `epochs`
  passes over the new task at its rows per step. The optimiser is paretocl.optim (its
  `freeze=('base',)` trains the adapter alone).
  """
  config = setup.config
  s, p = config.sft, config.paretocl
  sources = _sft_sources(setup, tasks)
  replay = _sft_sources(setup, config.tasks[:stage])
  batch_size = s.batch_size + p.replay_batch_size
  new_rows = s.batch_size if replay else batch_size
  data_config = dataclasses.replace(
      setup.data_config(product="sft", prompt_style="sft", batch_size=batch_size, train=True),
      replay_fraction=p.replay_batch_size / batch_size if replay else 0.0, replay_unit="example",
      replay_examples_per_task=p.replay_examples_per_task or None)
  data = pipeline_lib.Pipeline(sources, setup.tokenizer, data_config, replay=replay,
                               model_config=setup.model_config)
  data_iter = iter(data)
  num_examples = sum(len(ts.source) for ts in sources)
  total_steps = s.total_steps or max(1, math.ceil(epochs * num_examples / new_rows))

  key = setup.program_key("paretocl", p.optim.to_json(), total_steps, p.num_preferences,
                          p.concentration)
  if key not in _PROGRAMS:
    optimizer = optim.make_optimizer(p.optim, setup.abstract_params,
                                     max(1, total_steps // p.optim.grad_accum_steps))
    abstract_state, state_sh, init = _state_programs(setup, optimizer)
    step_fn = vlm.make_train_step(
        setup.graphdef, optimizer, num_preferences=p.num_preferences,
        concentration=p.concentration, compute_dtype=setup.compute_dtype,
        remat_policy=config.remat_policy or None, state_sharding=state_sh)
    _PROGRAMS[key] = (abstract_state, init, step_fn)
  abstract_state, init, step_fn = _PROGRAMS[key]

  def train(state, ckpt, writer):
    step = int(state.step)
    while step < total_steps:
      batch = next(data_iter)
      row_tasks = np.asarray(batch["task"]).astype(str)
      batch["is_new"] = np.isin(row_tasks, tasks).astype(np.int32)
      state, metrics = step_fn(state, sharding.shard_batch(
          vlm.device_batch(batch), setup.mesh, rules=setup.rules))
      step += 1
      if step % config.log_every == 0 or step == total_steps:
        names, per_task = np.unique(row_tasks, return_counts=True)
        writer.write(step, {**jax.device_get(metrics),
                            **{f"rows/{t}": int(n) for t, n in zip(names, per_task)}})
      _maybe_save(ckpt, step, total_steps, state, data_iter, config)
      if setup.on_step is not None:
        setup.on_step(stage, step)
    return state

  earlier = "+".join(config.tasks[:stage]) or "none (first task: L_new only)"
  return _run_stage(setup, params, stage, stage_dir, abstract_state, init, data_iter,
                    total_steps, train,
                    f"ParetoCL on {'+'.join(tasks)}: {num_examples} examples, {total_steps} "
                    f"steps of {new_rows} new + {batch_size - new_rows} replay rows; "
                    f"replay of {earlier}")


TRAINERS = {"sft": train_sft_stage, "rft": train_rft_stage, "paretocl": train_paretocl_stage}


# ------------------------------------------------------------------ stage plumbing


# One program copies a whole parameter tree (a per-leaf jnp.copy compiles once per shape).
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _state_programs(setup: Setup, optimizer: optim.Optimizer):
  """(abstract TrainState with shardings, its shardings, jitted init(params, rng) -> state);
  init donates `params` (an RFT stage has copied its KL reference before)."""
  def init_state(params, rng):
    return optim.create_train_state(params, optimizer, rng)
  abstract, state_sh = sft_loop.abstract_train_state(
      init_state, setup.abstract_params, setup.param_shardings, setup.mesh, jax.random.PRNGKey(0))
  init = jax.jit(init_state, out_shardings=state_sh, donate_argnums=0)
  return abstract, state_sh, init


def _maybe_save(ckpt, step, total, state, data_iter, config) -> None:
  preempted = ckpt.reached_preemption(step)
  if preempted or step == total or step % config.ckpt.every == 0:
    ckpt.save(step, state, data_iter=data_iter, force=True, metadata={"total": total})
  if preempted:
    ckpt.wait()
    raise Preempted(f"stopped at step {step} of {total}")


def _run_stage(setup: Setup, params, stage, stage_dir, abstract_state, init, data_iter, total,
               train, description: str) -> PyTree:
  """Restores the stage's latest checkpoint (or starts from `params`), trains, returns the
  final weights; the checkpointer is closed (pending saves written) even on an error."""
  ckpt = checkpoint_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"),
                                     max_to_keep=setup.config.ckpt.keep,
                                     async_save=setup.config.ckpt.async_save)
  writer = None
  try:
    restored = ckpt.restore_latest(abstract_state, data_iter=data_iter)
    if restored is not None:
      state = restored[0]
    else:
      state = init(params, setup.stage_rng(stage))
    start = int(ckpt.latest_step() or 0)
    writer = writer_lib.MetricWriter(stage_dir, config=setup.config, total_steps=total,
                                     start_step=start)
    writer.log("stage %d: %s (from step %d)", stage, description, start)
    _print(f"stage {stage}: {description}" + (f", resuming at {start}" if start else ""))
    with sharding.use_mesh(setup.mesh, setup.rules):
      state = train(state, ckpt, writer)
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
  return state.params


def _print(message: str) -> None:
  """Progress line on the terminal (process 0), also logged."""
  logging.info(message)
  if jax.process_index() == 0:
    print(f"[cpt] {message}", flush=True)


# ------------------------------------------------------------------ the loop


def _step_metrics(workdir: str, stages: Sequence[str]) -> list[dict]:
  """Per-step metrics of the stages so far (the report's reward-variance plot)."""
  out = []
  for j, name in enumerate(stages):
    stage_dir = os.path.join(workdir, "stages", _stage_dir_name(j, name))
    if os.path.exists(os.path.join(stage_dir, writer_lib.METRICS_FILE)):
      out += writer_lib.read_metrics(stage_dir)
  return out


def _write_report(workdir: str, progress: Progress, joint: bool, config) -> dict[str, Any]:
  general = progress.general
  before = after = None
  if general and progress.zero_shot is not None and progress.rows:
    before = {g: progress.zero_shot[g] for g in general}
    after = {g: progress.rows[-1][g] for g in general}
  return report_lib.write_report(
      workdir, method=progress.method, task_names=progress.tasks,
      matrix=progress.matrix(joint), general_before=before, general_after=after,
      step_metrics=_step_metrics(workdir, progress.stages[:len(progress.rows)]),
      config=config)


def _row(results: Mapping[str, evaluate_lib.TaskResult]) -> dict[str, float]:
  return {task: r.accuracy for task, r in results.items()}


def _summary_line(label: str, row: Mapping[str, float]) -> str:
  return f"{label}: " + ", ".join(f"{t} {v:.3f}" for t, v in row.items())


def run(config, workdir: str, *, on_step: StepHook | None = None) -> dict[str, Any]:
  """Runs (or resumes) the continual sequence of `config` in `workdir`; returns report.json's
  content plus `preempted`. `on_step(stage, step)` is called after every training step."""
  if jax.process_count() > 1:
    raise ValueError("the cpt loop runs in one process (evaluation and rollouts are assembled "
                     "on one host)")
  method, config = resolve_method(config)
  if method.trainer not in TRAINERS:
    raise ValueError(f"method {config.method!r} names trainer {method.trainer!r}; known: "
                     f"{sorted(TRAINERS)}")
  if config.sft.steps_per_call < 1:
    raise ValueError(f"sft.steps_per_call must be >= 1, got {config.sft.steps_per_call}")
  tasks, general = list(config.tasks), list(config.general)
  if not tasks:
    raise ValueError("config.tasks is empty: name the task sequence")
  overlap = sorted(set(tasks) & set(general))
  if overlap or len(set(tasks)) != len(tasks):
    raise ValueError(f"tasks must be unique and disjoint from the general sets; tasks {tasks}, "
                     f"general {general}")
  if method.trainer == "paretocl":
    if method.joint:
      raise ValueError(f"method {config.method!r}: ParetoCL replays earlier tasks, it has no "
                       "joint stage")
    check_paretocl_config(config)
  os.makedirs(workdir, exist_ok=True)
  setup = _setup(config, workdir, on_step, method)
  config = setup.config
  stages = [JOINT_STAGE] if method.joint else tasks
  progress = Progress.load_or_new(workdir, method=config.method, tasks=tasks, general=general,
                                  stages=stages, settings=_settings(config))
  eval_style = _eval_prompt_style(config, method)
  trainer = TRAINERS[method.trainer]

  params = None
  if progress.zero_shot is None and config.eval.zero_shot:
    params = _initial_params(setup)
    _print("evaluating the starting model (zero-shot row)")
    preferences = {}
    results = evaluate_params(setup, params, eval_style, preferences=preferences)
    _write_eval(workdir, "zero_shot", results, preferences)
    progress.zero_shot = _row(results)
    progress.save(workdir)
    _print(_summary_line("zero-shot", progress.zero_shot))

  preempted, report = False, None
  for j, name in enumerate(stages):
    if j < len(progress.rows):
      continue  # finished: its weights are loaded below if the next stage needs them
    if params is None:
      params = (_initial_params(setup) if j == 0 else checkpoint_lib.restore_params(
          os.path.join(workdir, "stages", _stage_dir_name(j - 1, stages[j - 1]), "checkpoints"),
          setup.abstract_params))
    stage_tasks = tasks if method.joint else [name]
    section = config.rft if method.trainer == "rft" else config.sft  # epochs
    epochs = section.epochs if method.joint else _stage_epochs(section, name)
    stage_dir = os.path.join(workdir, "stages", _stage_dir_name(j, name))
    t0 = time.perf_counter()
    try:
      params = trainer(setup, params, stage_tasks, j, stage_dir, epochs)
    except Preempted as e:
      _print(f"preempted in stage {j} ({name}): {e}")
      preempted = True
      break
    t_train = time.perf_counter() - t0
    preferences = {}
    results = evaluate_params(setup, params, eval_style, preferences=preferences)
    _write_eval(workdir, _stage_dir_name(j, name), results, preferences)
    progress.rows.append(_row(results))
    progress.save(workdir)
    report = None
    if config.report_every_stage or len(progress.rows) == len(stages):
      report = _write_report(workdir, progress, method.joint, config)
    _print(f"stage {j} ({name}) done: trained {t_train:.0f}s, evaluated "
           f"{time.perf_counter() - t0 - t_train:.0f}s")
    _print(_summary_line(f"after {name}", progress.rows[-1]))

  if report is None and progress.rows:  # nothing trained in this call, or a partial matrix
    report = _write_report(workdir, progress, method.joint, config)
  return {**(report or {}), "zero_shot": progress.zero_shot, "preempted": preempted}
