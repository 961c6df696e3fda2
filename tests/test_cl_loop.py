"""The continual loop (job 'cpt') on a micro config: full accuracy matrix and report files,
resume after a kill inside task 2 (same final weights and matrix as an uninterrupted run,
task 1 not redone), method dispatch, ParetoCL (replay batches, adapter in the checkpoints,
resume); and decode-based evaluation against known answers."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from cpt_jax import checkpoint as checkpoint_lib
from cpt_jax import models
from cpt_jax import writer as writer_lib
from cpt_jax.cl import evaluate as evaluate_lib
from cpt_jax.cl import loop
from cpt_jax.cl import report as report_lib
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.data import prompts
from cpt_jax.data import synthetic
from cpt_jax.data import tokenizer as tokenizer_lib
from cpt_jax.rl.sampler import SampleOutput
from cpt_jax.train import loop as train_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # config files import `configs.common`, found from the repo root
try:
  from configs.cpt import base, qwen2_5_vl_7b  # noqa: E402
  from configs.demo import default as demo_config  # noqa: E402
finally:
  sys.path.remove(ROOT)

TASKS = ("pathvqa", "gqa")
GENERAL = ("general",)
SFT_STEPS = 2
RFT_ITERATIONS = 2


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """Data of the two tasks + the general set, and a tokenizer trained on their texts."""
  root = tmp_path_factory.mktemp("cpt")
  data_dir = root / "data"
  synthetic.build_synthetic(data_dir, (*TASKS, *GENERAL, "scienceqa", "superclevr"),
                            train_size=16, test_size=8)
  corpus = [tokenizer_lib.CHAT_TEMPLATE]
  for task in (*TASKS, *GENERAL, "scienceqa", "superclevr"):
    source = synthetic.load_split(data_dir, task, "train")
    for i in range(len(source)):
      r = source[i]
      corpus.append(prompts.prompt_text(task, r["question"].decode(),
                                        [o.decode() for o in r["options"]], "sft"))
      corpus.append(r["answer"].decode())
  tokenizer_lib.train_tokenizer(root / "tokenizer", corpus, vocab_size=320)
  return root


def micro_config(shared, method: str):
  """The mini demo's continual run on two tasks: same model and programs as tests/test_demo.py,
  so that one test session compiles them once."""
  mini = demo_config.get_config("mini,runs=sft+rft+paretocl")
  c = mini.runs.sft
  c.rft = mini.runs.rft.rft
  c.method = method
  if method == "paretocl":
    c.paretocl = mini.runs.paretocl.paretocl
  c.tasks, c.general = TASKS, GENERAL
  c.data.dir = str(shared / "data")
  c.data.synthetic = dict(train_size=16, test_size=8, image_size=56, seed=0)
  c.tokenizer.path = str(shared / "tokenizer")
  assert (c.sft.total_steps, c.rft.num_iterations) == (SFT_STEPS, RFT_ITERATIONS)
  c.ckpt.every = 1
  c.report_every_stage = True
  return c


def final_params(workdir):
  progress = json.loads((workdir / loop.PROGRESS_FILE).read_text())
  j = len(progress["rows"]) - 1
  directory = workdir / "stages" / f"{j}_{progress['stages'][j]}" / "checkpoints"
  return checkpoint_lib.restore_params(directory, None)


class Recorder:
  """on_step hook: records (stage, step) and raises Killed at `kill_at`."""

  class Killed(Exception):
    pass

  def __init__(self, kill_at=None):
    self.calls, self.kill_at = [], kill_at

  def __call__(self, stage, step):
    self.calls.append((stage, step))
    if (stage, step) == self.kill_at:
      raise self.Killed


@pytest.fixture(scope="module")
def sft_run(shared):
  workdir = shared / "sft"
  hook = Recorder()
  return workdir, loop.run(micro_config(shared, "sft"), str(workdir), on_step=hook), hook


# ------------------------------------------------------------------ the loop


def test_sft_run_writes_full_matrix_and_report(sft_run):
  workdir, result, hook = sft_run
  assert hook.calls == [(j, s) for j in range(2) for s in range(1, SFT_STEPS + 1)]
  progress = json.loads((workdir / loop.PROGRESS_FILE).read_text())
  assert progress["stages"] == list(TASKS) and len(progress["rows"]) == 2
  assert set(progress["zero_shot"]) == {*TASKS, *GENERAL}
  matrix = np.array([[row[t] for t in TASKS] for row in progress["rows"]])
  np.testing.assert_array_equal(result["matrix"], matrix)
  assert result["num_trained"] == 2 and result["method"] == "sft"
  assert result["avg_acc"] == pytest.approx(matrix[-1].mean())
  assert result["fm"] == pytest.approx(matrix[1, 0] - matrix[0, 0])
  assert result["general"]["general"] == pytest.approx({
      "before": progress["zero_shot"]["general"], "after": progress["rows"][-1]["general"],
      "delta": progress["rows"][-1]["general"] - progress["zero_shot"]["general"]})
  for name in (report_lib.REPORT_JSON, report_lib.MATRIX_CSV, report_lib.REPORT_MD,
               report_lib.HEATMAP_PNG, report_lib.CURVES_PNG, "evals/zero_shot.json",
               "evals/0_pathvqa.json", "evals/1_gqa.json"):
    assert (workdir / name).is_file(), name
  shown = json.loads((workdir / "evals/1_gqa.json").read_text())
  assert shown["gqa"]["num_examples"] == 4 and shown["general"]["num_examples"] == 4
  # SFT metrics per stage, and each stage moved the weights.
  metrics = writer_lib.read_metrics(workdir / "stages" / "0_pathvqa")
  assert [m["step"] for m in metrics] == list(range(1, SFT_STEPS + 1))
  assert "answer_tokens" in metrics[0] and "reward_var_within" not in metrics[0]
  first = checkpoint_lib.restore_params(workdir / "stages/0_pathvqa/checkpoints", None)
  last = final_params(workdir)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first),
                                                      jax.tree.leaves(last)))


def test_resume_after_kill_inside_task_two(shared, sft_run):
  reference_dir, reference, _ = sft_run
  workdir = shared / "sft_killed"
  killer = Recorder(kill_at=(1, 1))
  with pytest.raises(Recorder.Killed):
    loop.run(micro_config(shared, "sft"), str(workdir), on_step=killer)
  progress = json.loads((workdir / loop.PROGRESS_FILE).read_text())
  assert len(progress["rows"]) == 1  # task 1 finished and recorded, task 2 not
  partial = report_lib.load_report(workdir)  # the report is rewritten after every task
  assert partial["num_trained"] == 1 and partial["matrix"] == reference["matrix"][:1]
  assert checkpoint_lib.Checkpointer(workdir / "stages/1_gqa/checkpoints",
                                     handle_sigterm=False).latest_step() == 1

  resumed = Recorder()
  result = loop.run(micro_config(shared, "sft"), str(workdir), on_step=resumed)
  assert resumed.calls == [(1, 2)]  # no step of task 1, task 2 from its checkpoint
  np.testing.assert_array_equal(result["matrix"], reference["matrix"])
  assert result["zero_shot"] == reference["zero_shot"]
  for a, b in zip(jax.tree.leaves(final_params(workdir)),
                  jax.tree.leaves(final_params(reference_dir))):
    np.testing.assert_array_equal(a, b)
  metrics = writer_lib.read_metrics(workdir / "stages" / "1_gqa")
  assert [m["step"] for m in metrics] == list(range(1, SFT_STEPS + 1))


def test_sft_steps_per_call_runs_task_one_as_one_program(shared, sft_run, monkeypatch):
  """sft.steps_per_call=2: task 1's two steps in one scan program end where the reference's
  one step per call does (a different program: within float tolerance), with the same
  per-step losses, hook calls and checkpoint."""
  reference_dir = sft_run[0]
  calls, step_calls = [], train_loop.step_calls

  def recorded_step_calls(*args):
    out = step_calls(*args)
    calls.append([n for _, _, n in out])
    return out

  monkeypatch.setattr(train_loop, "step_calls", recorded_step_calls)
  c = micro_config(shared, "sft")
  c.sft.steps_per_call, c.ckpt.every, c.log_every = 2, 2, 1
  method, c = loop.resolve_method(c)
  workdir, hook = shared / "sft_per_call", Recorder()
  setup = loop._setup(c, str(workdir), hook, method)
  params = loop.train_sft_stage(setup, loop._initial_params(setup), [TASKS[0]], 0,
                                str(workdir / "stage"), epochs=1.0)
  assert calls == [[2]] and hook.calls == [(0, 1), (0, 2)]
  reference = checkpoint_lib.restore_params(reference_dir / "stages/0_pathvqa/checkpoints", None)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-5, rtol=0)
  got = writer_lib.read_metrics(workdir / "stage")
  want = writer_lib.read_metrics(reference_dir / "stages" / "0_pathvqa")
  assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2]
  np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in want], rtol=1e-5)
  assert checkpoint_lib.Checkpointer(workdir / "stage/checkpoints",
                                     handle_sigterm=False).latest_step() == 2
  c.sft.steps_per_call = 0
  with pytest.raises(ValueError, match="sft.steps_per_call must be >= 1, got 0"):
    loop.run(c, str(shared / "bad_per_call"))


def test_rft_resume_and_metrics(shared):
  """RFT stages log GRPO metrics (reward variance, KL reference forwards), write the variance
  plot, and a kill inside task 2 resumes to the same weights (rollout keys come from the
  checkpointed RNG)."""
  reference_dir = shared / "rft"
  reference = loop.run(micro_config(shared, "rft"), str(reference_dir))
  metrics = writer_lib.read_metrics(reference_dir / "stages" / "1_gqa")
  assert [m["step"] for m in metrics] == list(range(1, RFT_ITERATIONS + 1))
  assert {"reward_var_within", "grad_norm", "kl"} <= set(metrics[0])
  assert metrics[0]["reference_forwards"] > 0
  assert reference["variance_fit"]["num_steps"] == 2 * RFT_ITERATIONS
  assert (reference_dir / report_lib.VARIANCE_PNG).is_file()

  workdir = shared / "rft_killed"
  with pytest.raises(Recorder.Killed):
    loop.run(micro_config(shared, "rft"), str(workdir), on_step=Recorder(kill_at=(1, 1)))
  resumed = Recorder()
  result = loop.run(micro_config(shared, "rft"), str(workdir), on_step=resumed)
  assert resumed.calls == [(1, 2)]
  np.testing.assert_array_equal(result["matrix"], reference["matrix"])
  for a, b in zip(jax.tree.leaves(final_params(workdir)),
                  jax.tree.leaves(final_params(reference_dir))):
    np.testing.assert_array_equal(a, b)


def test_multitask_is_one_joint_stage(shared):
  workdir = shared / "multitask"
  hook = Recorder()
  result = loop.run(micro_config(shared, "multitask"), str(workdir), on_step=hook)
  assert hook.calls == [(0, s) for s in range(1, SFT_STEPS + 1)]
  progress = json.loads((workdir / loop.PROGRESS_FILE).read_text())
  assert progress["stages"] == [loop.JOINT_STAGE] and len(progress["rows"]) == 1
  matrix = np.asarray(result["matrix"])
  np.testing.assert_array_equal(matrix, np.tile(matrix[:1], (len(TASKS), 1)))
  assert result["fm"] == 0.0 and result["bwt"] == 0.0 and result["num_trained"] == len(TASKS)


def test_rif_rft_filters_before_each_task(shared):
  config = micro_config(shared, "rif_rft")
  # The untrained model gets everything wrong; keeping those (and dropping all-right ones)
  # exercises the filter without emptying the task.
  config.rft.rif.update(drop_all_wrong=False, drop_all_right=True)
  config.tasks = TASKS[:1]
  workdir = shared / "rif_rft"
  loop.run(config, str(workdir))
  saved = json.loads((workdir / "stages/0_pathvqa" / loop.RIF_FILE).read_text())
  assert saved["stats"]["num_instances"] == 16
  assert len(saved["kept_ids"]) == saved["stats"]["num_kept"] == 16 - saved["stats"][
      "num_all_right"]


@pytest.mark.parametrize("method, overrides", [
    ("sft", {}),
    ("rft_no_kl", {"rft.rl.use_kl": False}),
    ("rft_no_cot", {"rft.prompt_style": "rft_no_cot", "rft.rl.reward": "no_cot"}),
    ("rif_rft", {"rft.rif.mode": "offline"}),
])
def test_resolve_method_applies_overrides(method, overrides):
  c = base.cpt_config()
  c.method = method
  resolved_method, resolved = loop.resolve_method(c)
  assert resolved_method is loop.METHODS[method]
  for path, value in overrides.items():
    node = resolved
    for name in path.split("."):
      node = node[name]
    assert node == value
  assert c.rft.rl.use_kl and c.rft.rif.mode == "none"  # the input config is left alone


def test_paper_config():
  c = qwen2_5_vl_7b.get_config("method=rif_rft,ckpt=/ckpt")
  assert c.job == "cpt" and c.method == "rif_rft" and c.model.pretrained == "/ckpt"
  assert c.tasks == ("scienceqa", "textvqa", "vizwiz", "gqa", "geometry3k", "pathvqa",
                     "superclevr")
  assert c.general == ("mmmu", "mmlu_pro", "pope") and c.compute_dtype == "bfloat16"
  assert (c.sft.optim.lr, c.sft.optim.schedule, c.sft.optim.warmup_ratio, c.sft.epochs) == (
      1e-5, "cosine", 0.1, 1.0)
  assert (c.rft.optim.lr, c.rft.optim.weight_decay, c.rft.optim.grad_clip_norm) == (
      1e-6, 0.01, 1.0)
  rl = c.rft.rl
  assert (rl.n, rl.temperature, rl.top_p, rl.eps_low, rl.eps_high, rl.dual_clip, rl.kl_coef,
          rl.kl_estimator, rl.rollout_batch_size, rl.update_batch_size, rl.reward) == (
      8, 1.0, 0.99, 0.2, 0.3, 3.0, 0.01, "low_var_kl", 512, 128, "cot_boxed")
  epochs = [c.rft.epochs_per_task.get(t, c.rft.epochs) for t in c.tasks]
  assert epochs == [5, 1, 1, 1, 10, 1, 3]
  assert (c.data.min_pixels, c.data.max_pixels, c.data.max_len, rl.max_response_length) == (
      200_704, 1_003_520, 4096, 1024)
  _, resolved = loop.resolve_method(c)
  assert resolved.rft.rif.mode == "offline" and resolved.rft.rif.drop_all_wrong
  with pytest.raises(ValueError, match="method must be one of"):
    qwen2_5_vl_7b.get_config("method=ppo")


def test_bad_configs_are_named(shared, tmp_path):
  c = micro_config(shared, "ppo")
  with pytest.raises(ValueError, match="unknown method 'ppo'"):
    loop.run(c, str(tmp_path / "a"))
  c = micro_config(shared, "sft")
  c.general = ("pathvqa",)
  with pytest.raises(ValueError, match="disjoint"):
    loop.run(c, str(tmp_path / "b"))


# ------------------------------------------------------------------ ParetoCL


@pytest.fixture(scope="module")
def paretocl_run(shared):
  """The micro ParetoCL run, with every training batch the step received (host side)."""
  workdir = shared / "paretocl"
  hook, batches = Recorder(), []
  device_batch = loop.vlm.device_batch

  def recording_device_batch(batch):
    batches.append({k: np.asarray(batch[k]) for k in ("task", "id", "is_new", "input_ids")})
    return device_batch(batch)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loop.vlm, "device_batch", recording_device_batch)
    result = loop.run(micro_config(shared, "paretocl"), str(workdir), on_step=hook)
  return workdir, result, hook, batches


def test_paretocl_runs_the_sequence_with_replay(shared, paretocl_run):
  workdir, result, hook, batches = paretocl_run
  config = micro_config(shared, "paretocl")
  p, new_rows = config.paretocl, config.sft.batch_size
  assert hook.calls == [(j, s) for j in range(2) for s in range(1, SFT_STEPS + 1)]
  assert result["method"] == "paretocl" and result["num_trained"] == 2
  progress = json.loads((workdir / loop.PROGRESS_FILE).read_text())
  matrix = np.array([[row[t] for t in TASKS] for row in progress["rows"]])
  np.testing.assert_array_equal(result["matrix"], matrix)
  assert set(result["general"]) == set(GENERAL)
  # Task 1: only its own rows, all marked new (nothing to replay yet), batch of B + R.
  for b in batches[:SFT_STEPS]:
    assert list(b["task"]) == ["pathvqa"] * (new_rows + p.replay_batch_size)
    assert b["is_new"].all()
  # Task 2: B new gqa rows and R replayed pathvqa rows from a buffer of
  # replay_examples_per_task training examples.
  replayed = set()
  for b in batches[SFT_STEPS:]:
    tasks = b["task"].astype(str)
    assert sorted(tasks) == sorted(["gqa"] * new_rows + ["pathvqa"] * p.replay_batch_size)
    np.testing.assert_array_equal(b["is_new"], tasks == "gqa")
    replayed |= set(b["id"][tasks == "pathvqa"].astype(str))
  assert all(i.startswith("pathvqa-train-") for i in replayed)
  assert len(replayed) <= p.replay_examples_per_task
  metrics = writer_lib.read_metrics(workdir / "stages" / "1_gqa")
  assert [m["rows/pathvqa"] for m in metrics] == [p.replay_batch_size] * SFT_STEPS
  assert {"loss_new", "loss_replay", "grad_norm"} <= set(metrics[0])
  # Checkpoints hold the base weights and the adapter; training moved the adapter's B off 0.
  saved = final_params(workdir)
  assert set(saved) == {"base", "adapter"}
  assert set(saved["adapter"]) == {"down", "hypernet", "up"}
  assert {"language_model", "visual"} <= set(saved["base"])
  assert np.abs(saved["adapter"]["up"]).max() > 0
  # Evaluation recorded each prompt's chosen preference.
  choices = json.loads((workdir / "evals/1_gqa.preferences.json").read_text())
  assert len(choices["alphas"]) == p.eval_preferences
  evals = json.loads((workdir / "evals/1_gqa.json").read_text())
  for task in (*TASKS, *GENERAL):
    assert sum(choices[task]["chosen_counts"]) == evals[task]["num_examples"] == 4


def test_paretocl_resume_after_kill_inside_task_two(shared, paretocl_run):
  reference_dir, reference, _, _ = paretocl_run
  workdir = shared / "paretocl_killed"
  with pytest.raises(Recorder.Killed):
    loop.run(micro_config(shared, "paretocl"), str(workdir), on_step=Recorder(kill_at=(1, 1)))
  resumed = Recorder()
  result = loop.run(micro_config(shared, "paretocl"), str(workdir), on_step=resumed)
  assert resumed.calls == [(1, 2)]
  np.testing.assert_array_equal(result["matrix"], reference["matrix"])
  for a, b in zip(jax.tree.leaves(final_params(workdir)),
                  jax.tree.leaves(final_params(reference_dir))):
    np.testing.assert_array_equal(a, b)


def test_paretocl_decodes_each_prompt_at_its_chosen_preference(shared, paretocl_run, tmp_path):
  """With a random adapter B (preferences then change the answers), every response equals the
  greedy decode of the model folded at that prompt's chosen preference. The micro prompts all
  pick the same preference, so the choice is replaced by row % K (K distinct per batch)."""
  workdir, _, _, _ = paretocl_run
  method, config = loop.resolve_method(micro_config(shared, "paretocl"))
  setup = loop._setup(config, str(tmp_path), None, method)  # pylint: disable=protected-access
  params = checkpoint_lib.restore_params(workdir / "stages/1_gqa/checkpoints",
                                         setup.abstract_params)
  up = params["adapter"]["up"]
  params["adapter"]["up"] = jax.device_put(
      3.0 * jax.random.normal(jax.random.PRNGKey(1), up.shape), up.sharding)
  p = config.paretocl
  assert config.eval.batch_size == p.eval_preferences == 4

  def select(params, batch):
    return {"chosen": np.arange(len(batch["input_ids"])) % p.eval_preferences}

  preferences = {}
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(loop._PROGRAMS, setup.program_key(  # pylint: disable=protected-access
        "paretocl_select", p.eval_preferences, p.eval_seed), select)
    results = loop.evaluate_params(setup, params, "sft", preferences=preferences)
  assert preferences["decodes_per_batch"] == p.eval_preferences

  alphas = np.asarray(preferences["alphas"])
  model = setup.model(params)
  evaluator = evaluate_lib.Evaluator(
      [s for t in (*TASKS, *GENERAL) for s in setup.sources([t], "test")], setup.tokenizer,
      setup.data_config(product="prompt", prompt_style="sft", batch_size=config.eval.batch_size,
                        train=False), max_examples=config.eval.max_examples)
  reference = []  # per preference: id -> greedy response of the model folded at it
  for alpha in alphas:
    generate = loop._sampler_generate(setup, setup.sampler_of(  # pylint: disable=protected-access
        config.eval.max_new_tokens, loop.vlm.fold_preference(model, alpha)))
    responses = {}

    def record(batch, generate=generate, responses=responses):
      out = generate(batch)
      responses.update(zip(batch["id"].astype(str), out))
      return out

    evaluator(record)
    reference.append(responses)
  chosen = {i: g for t in (*TASKS, *GENERAL) for i, g in preferences[t]["chosen"].items()}
  assert any(len({r[i] for r in reference}) > 1 for i in chosen)  # and it matters
  for task in (*TASKS, *GENERAL):
    assert len(results[task].examples) == 4
    for shown in results[task].examples:
      assert shown["response"] == reference[chosen[shown["id"]]][shown["id"]], shown["id"]


@pytest.mark.parametrize("field, value, message", [
    ("rank", 0, "config.paretocl.rank must be an integer >= 1"),
    ("eval_preferences", 0, "config.paretocl.eval_preferences must be an integer >= 1"),
    ("concentration", 0.0, "config.paretocl.concentration must be > 0"),
    ("replay_examples_per_task", -1, "config.paretocl.replay_examples_per_task"),
])
def test_bad_paretocl_config_is_named(shared, tmp_path, field, value, message):
  c = micro_config(shared, "paretocl")
  c.paretocl[field] = value
  with pytest.raises(ValueError, match=message):
    loop.run(c, str(tmp_path))


def test_paretocl_without_its_section_is_named(shared, tmp_path):
  c = micro_config(shared, "sft")
  c.method = "paretocl"
  with pytest.raises(ValueError, match="needs a config.paretocl section"):
    loop.run(c, str(tmp_path))
  c.paretocl = {"rank": 4}
  with pytest.raises(ValueError, match="config.paretocl lacks"):
    loop.run(c, str(tmp_path))


def test_paretocl_paper_config():
  c = qwen2_5_vl_7b.get_config("method=paretocl,ckpt=/ckpt")
  assert c.method == "paretocl" and "paretocl" in base.METHODS
  loop.check_paretocl_config(c)
  assert c.paretocl.replay_batch_size == c.sft.batch_size // 2
  assert c.paretocl.num_preferences == 5 and c.paretocl.eval_preferences == 20
  assert loop.METHODS["paretocl"].trainer == "paretocl" and "paretocl" in loop.TRAINERS


def test_workdir_of_another_run_is_refused(shared, sft_run):
  workdir, _, _ = sft_run
  with pytest.raises(ValueError, match="method=sft"):
    loop.run(micro_config(shared, "rft"), str(workdir))


# ------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def eval_setup(shared):
  tokenizer = tokenizer_lib.load_tokenizer(shared / "tokenizer")
  sources = pipeline_lib.open_sources(shared / "data", ("scienceqa", "superclevr"), "test",
                                      "synthetic")
  config = pipeline_lib.DataConfig(product="prompt", prompt_style="sft", batch_size=3,
                                   max_len=256, fixed_size=(56, 56), min_pixels=56 * 56)
  answers = {}
  for s in sources:
    for i in range(len(s.source)):
      answers[s.source[i]["id"].decode()] = s.source[i]["answer"].decode()
  return tokenizer, sources, config, answers


def stub_response(ident: str, answer: str) -> str:
  """Right for even ids, in four formats; wrong for odd ids (in formats that could fool a
  sloppy grader)."""
  k = int(ident.rsplit("-", 1)[1])
  if k % 2:
    return {1: f"\\boxed{{{answer}}} no wait \\boxed{{zzz}}", 3: f"not {answer}",
            5: "", 7: f"\\boxed{{{answer}"}[k]
  return {0: answer, 2: f"<think>easy</think> \\boxed{{{answer}}}", 4: f"The answer is {answer}.",
          6: f"  {answer.upper()} "}[k]


def test_evaluator_scores_known_answers(eval_setup):
  tokenizer, sources, config, answers = eval_setup
  evaluator = evaluate_lib.Evaluator(sources, tokenizer, config, max_examples=8)
  seen = []

  def generate(batch):
    seen.append(len(batch["prompt_ids"]))
    return [stub_response(str(i), answers[str(i)]) for i in batch["id"]]

  results = evaluator(generate)
  assert seen == [3, 3, 2, 3, 3, 2]  # per task, ordered, last batch partial
  for task in ("scienceqa", "superclevr"):
    assert results[task].num_examples == 8
    assert results[task].accuracy == 0.5  # ids 0, 2, 4, 6 right; 1, 3, 5, 7 wrong
    assert results[task].format == 1 / 8  # only id 2 has <think>...</think> ... \boxed{}
    assert results[task].examples[0]["response"] == answers[f"{task}-test-000000"]
  assert len(results["scienceqa"].examples) == evaluate_lib.NUM_SHOWN


def test_evaluator_head_and_no_examples(eval_setup):
  tokenizer, sources, config, answers = eval_setup
  results = evaluate_lib.Evaluator(sources[:1], tokenizer, config, max_examples=2)(
      lambda b: [answers[str(i)] for i in b["id"]])
  assert results["scienceqa"].num_examples == 2 and results["scienceqa"].accuracy == 1.0
  with pytest.raises(ValueError, match="2 responses for 3 prompts"):
    evaluate_lib.Evaluator(sources[:1], tokenizer, config)(lambda b: ["A", "B"])


def test_sampler_generate_pads_and_decodes(eval_setup):
  """The sampler wrapper pads a partial batch to its batch size and drops the padding rows;
  responses are decoded up to each row's EOS."""
  tokenizer, sources, config, answers = eval_setup
  ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
      ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
      ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
  model_config = models.ModelConfig.tiny(vocab_size=len(tokenizer), **ids)
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  calls = []

  class FakeSampler:
    def __call__(self, prompt_ids, prompt_mask, *, key, num_samples, temperature, top_p,
                 pixel_values, image_grid_thw):
      calls.append((len(prompt_ids), temperature, len(image_grid_thw)))
      rows = [tokenizer(f"answer {i}", add_special_tokens=False)["input_ids"] + [eos]
              for i in range(len(prompt_ids))]
      width = 8
      tokens = np.full((len(rows), width), pad, np.int32)
      for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
      lengths = np.array([len(r) for r in rows], np.int32)
      zeros = np.zeros(tokens.shape, np.float32)
      return SampleOutput(tokens, zeros, zeros, lengths, np.ones(len(rows), bool), width)

  generate = evaluate_lib.sampler_generate(FakeSampler(), tokenizer, model_config, batch_size=4)
  batches = list(pipeline_lib.Pipeline(sources[:1], tokenizer, dataclasses.replace(
      config, shuffle=False, drop_remainder=False)))
  last = batches[-1]  # 8 = 3 + 3 + 2 rows
  assert generate(last) == ["answer 0", "answer 1"]
  assert calls == [(4, 0.0, 4)]


def test_tokenizer_learns_the_answer_template(tmp_path):
  """The tokenizer trained for a run sees the answers as SFT writes them: with the paper's
  '<think> </think> \\boxed{...}' the wrapper costs a few tokens, not one per byte."""
  records = [{"task": b"gqa", "question": f"What color is object {i}?".encode(), "options": [],
              "answer": (b"red", b"blue", b"left")[i % 3]} for i in range(60)]
  sources = [pipeline_lib.TaskSource("gqa", records)]
  config = ml_collections.ConfigDict(dict(model=dict(pretrained=""), tokenizer=dict(
      path="", vocab_size=400, corpus_examples=60)))
  template = "<think> </think> \\boxed{{answer}}"
  response = "<think> </think> \\boxed{red}"
  plain = train_loop.make_tokenizer(config, str(tmp_path / "plain"), loop.templated(
      sources, "{answer}"))
  taught = train_loop.make_tokenizer(config, str(tmp_path / "taught"), loop.templated(
      sources, template))
  n_plain, n_taught = (len(t(response)["input_ids"]) for t in (plain, taught))
  assert n_taught * 2 <= n_plain, (n_plain, n_taught)
  with pytest.raises(ValueError, match="has no '{answer}'"):
    loop.templated(sources, "\\boxed{x}")
