"""The SFT job end to end through `python -m cpt_jax.main`, including preemption and resume."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from cpt_jax import checkpoint
from cpt_jax import main as main_lib
from cpt_jax import writer
from cpt_jax.data import synthetic
from cpt_jax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 8


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """Synthetic data, a tokenizer and a compilation cache shared by every run."""
  root = tmp_path_factory.mktemp("sft_e2e")
  data_dir = root / "data"
  synthetic.build_synthetic(data_dir, ("scienceqa",), train_size=48, test_size=16)
  tok_dir = root / "tokenizer"
  corpus = [f"Which shape is {c}? A. circle B. square C. triangle" for c in
            ("red", "blue", "green")] * 10 + ["Answer with the option's letter from the given "
                                               "choices directly.", tokenizer_lib.CHAT_TEMPLATE]
  tokenizer_lib.train_tokenizer(tok_dir, corpus, vocab_size=300)
  env = dict(os.environ,
             XLA_FLAGS=("--xla_force_host_platform_device_count=1 "
                        "--xla_backend_optimization_level=0"),
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")
  flags = [f"--config={ROOT}/configs/sft_synthetic.py:runlocal",
           f"--config.data.dir={data_dir}", f"--config.tokenizer.path={tok_dir}",
           "--config.data.synthetic.train_size=48", "--config.data.synthetic.test_size=16",
           f"--config.total_steps={TOTAL_STEPS}", "--config.ckpt.every=2", "--config.log_every=1",
           "--config.eval.max_examples=8", "--config.eval.max_new_tokens=4",
           "--config.eval.every=-1"]
  return root, env, flags


@pytest.fixture(scope="module")
def reference(shared, tmp_path_factory):
  """An uninterrupted run (evaluated at the end), started at once; tests wait for it."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run = Run(shared, workdir, "--config.eval.every=0")
  yield run, workdir
  if run.proc.poll() is None:
    run.proc.kill()


class Run:
  """`python -m cpt_jax.main` in a subprocess; its log is read line by line as it runs."""

  def __init__(self, shared, workdir, *extra):
    _, env, flags = shared
    cmd = [sys.executable, "-m", "cpt_jax.main", f"--workdir={workdir}", *flags, *extra]
    self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
    self.lines: queue.Queue = queue.Queue()
    self.log: list[str] = []
    self.returncode: int | None = None
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self):
    for line in self.proc.stderr:
      self.lines.put(line)
    self.lines.put(None)

  def wait_for(self, pattern: str) -> None:
    while (line := self.lines.get(timeout=300)) is not None:
      self.log.append(line)
      if pattern in line:
        return
    raise AssertionError(f"exited before logging {pattern!r}:\n{self.text[-3000:]}")

  def finish(self) -> int:
    returncode = self.proc.wait(timeout=300)
    while self.returncode is None and (line := self.lines.get(timeout=300)) is not None:
      self.log.append(line)
    self.returncode = returncode
    return returncode

  @property
  def text(self) -> str:
    return "".join(self.log)


def final_params(workdir):
  import jax  # noqa: PLC0415  (the pytest process has 8 devices; read on one)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  mgr = checkpoint.Checkpointer(ckpt_dir, handle_sigterm=False)
  step = mgr.latest_step()
  mgr.close()
  import orbax.checkpoint as ocp  # noqa: PLC0415
  meta = ocp.StandardCheckpointer().metadata(os.path.join(ckpt_dir, str(step), "params"))
  tree = getattr(meta, "item_metadata", meta)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
  return step, checkpoint.restore_params(ckpt_dir, abstract, step)


def test_preempt_kill_resume_matches_uninterrupted_run(shared, reference, tmp_path):
  reference, ref_dir = reference
  run_dir = tmp_path / "interrupted"
  # The others start once the reference has compiled the train step, and load that program
  # from the compilation cache.
  reference.wait_for("checkpoints/2`")
  # 1) SIGTERM as soon as training starts: the run saves the step it is on and exits cleanly.
  run = Run(shared, run_dir)
  run.wait_for("training from step 0")
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish() == 0 and "preempted: saved step 1" in run.text, run.text[-3000:]
  # 2) Resume, then SIGKILL right after the checkpoint of step 4 is complete.
  run = Run(shared, run_dir)
  run.wait_for("training from step 1 to 8")
  run.wait_for("checkpoints/4`")
  run.proc.send_signal(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  # 3) Resume to the end.
  run = Run(shared, run_dir)
  assert run.finish() == 0, run.text[-3000:]
  assert reference.finish() == 0, reference.text[-3000:]
  # Both ran with cpt_jax.host_memory's heap (the CPU default): resumes stay bit-identical.
  assert "host heap kept" in run.text and "host heap kept" in reference.text

  step, params = final_params(run_dir)
  ref_step, ref_params = final_params(ref_dir)
  assert step == ref_step == TOTAL_STEPS
  import jax  # noqa: PLC0415
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), jax.tree_util.keystr(path)
  # The metric log of the interrupted run equals the uninterrupted one, step for step.
  ref = {r["step"]: r for r in writer.read_metrics(ref_dir) if "loss" in r}
  got = {r["step"]: r for r in writer.read_metrics(run_dir) if "loss" in r}
  assert sorted(got) == sorted(ref) == list(range(1, TOTAL_STEPS + 1))
  assert [got[s]["loss"] for s in got] == [ref[s]["loss"] for s in got]
  assert ref[1]["loss"] > ref[TOTAL_STEPS]["loss"]
  evals = [r for r in writer.read_metrics(ref_dir) if "eval/all/exact_match" in r]
  assert len(evals) == 1 and evals[0]["step"] == TOTAL_STEPS
  assert 0 <= evals[0]["eval/scienceqa/accuracy"] <= 1   # decoded, extracted, graded


def test_steps_per_call_matches_one_step_per_call(shared, reference, tmp_path):
  # Two steps per call, but never past a checkpoint (every 3): calls of steps (1, 2), 3,
  # (4, 5), 6, (7, 8).
  run = Run(shared, tmp_path, "--config.steps_per_call=2", "--config.ckpt.every=3")
  assert run.finish() == 0, run.text[-3000:]
  reference, ref_dir = reference
  assert reference.finish() == 0, reference.text[-3000:]
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert sorted(saved) == [3, 6, 8]
  step, params = final_params(tmp_path)
  _, ref_params = final_params(ref_dir)
  assert step == TOTAL_STEPS
  import jax  # noqa: PLC0415
  # Another program, so not bit-identical (k_proj's bias has no gradient in exact arithmetic:
  # Adam turns its rounding noise into steps of ~1e-6).
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  ref = {r["step"]: r for r in writer.read_metrics(ref_dir) if "loss" in r}
  got = {r["step"]: r for r in writer.read_metrics(tmp_path) if "loss" in r}
  assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
  np.testing.assert_allclose([got[s]["loss"] for s in got], [ref[s]["loss"] for s in got],
                             rtol=1e-5)
  # The steps of one call share its time; single-step calls stand alone.
  time = {s: got[s]["step_time_s"] for s in got}
  assert time[1] == time[2] and time[4] == time[5] and time[7] == time[8]
  assert len({time[2], time[3], time[5], time[6], time[8]}) == 5


def test_unknown_config_key_is_an_error_naming_it(shared, tmp_path):
  run = Run(shared, tmp_path, "--config.optim.nope=1", "--config.data.batch_sise=4")
  assert run.finish() == 1
  assert "unknown config field 'nope'" in run.text and "--config.optim.nope" in run.text


def test_job_registry():
  known = r"\['cpt', 'paretocl_classic', 'rft', 'sft'\]"
  with pytest.raises(ValueError, match=rf"unknown job 'dpo'; known jobs: {known}"):
    main_lib.get_job("dpo")
  assert main_lib.get_job("sft").__module__ == "cpt_jax.train.loop"
  with pytest.raises(ValueError, match="already registered"):
    main_lib.register_job("sft", "somewhere:else")


def test_config_args():
  sys.path.insert(0, ROOT)
  try:
    from configs import common, sft_qwen2_5_vl_7b, sft_synthetic  # noqa: PLC0415
  finally:
    sys.path.remove(ROOT)
  assert common.parse_arg("runlocal,task=gqa", task="x", runlocal=False, n=1).to_dict() == {
      "task": "gqa", "runlocal": True, "n": 1}
  with pytest.raises(ValueError, match=r"unknown config arg 'tsk'; known: \['runlocal', 'task'\]"):
    sft_synthetic.get_config("tsk=gqa")
  with pytest.raises(ValueError, match="needs a value"):
    common.parse_arg("n", n=1)
  assert sft_synthetic.get_config("task=all").data.tasks[-1] == "superclevr"
  paper = sft_qwen2_5_vl_7b.get_config("task=geometry3k,ckpt=/ckpt")
  assert (paper.optim.lr, paper.optim.schedule, paper.optim.warmup_ratio) == (1e-5, "cosine", 0.1)
  assert (paper.num_epochs, paper.compute_dtype) == (10, "bfloat16")
  assert paper.model.pretrained == "/ckpt"
  # The paper config and the synthetic one have the same fields (the job reads them all).
  assert paper.keys() == sft_synthetic.get_config().keys()


def test_writer_files_and_resume_truncation(tmp_path):
  from ml_collections import ConfigDict  # noqa: PLC0415
  w = writer.MetricWriter(tmp_path, config=ConfigDict({"lr": 0.1}), total_steps=4,
                          progress_bar=False)
  for step in (1, 2, 3):
    w.write(step, {"loss": np.float32(1.0 / step), "skipped": np.int32(0)})
  w.close()
  with open(tmp_path / writer.METRICS_FILE, "a") as f:
    f.write('{"step": 4, "lo')   # a line cut short by a crash
  # Resuming from a checkpoint of step 2 drops the lines of steps 3 and 4.
  w = writer.MetricWriter(tmp_path, total_steps=4, start_step=2, progress_bar=False)
  w.write(3, {"loss": 0.25})
  w.close()
  assert writer.read_metrics(tmp_path) == [
      {"step": 1, "loss": 1.0, "skipped": 0}, {"step": 2, "loss": 0.5, "skipped": 0},
      {"step": 3, "loss": 0.25}]
  assert '"lr": 0.1' in (tmp_path / writer.CONFIG_FILE).read_text()
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  with pytest.raises(ValueError, match="scalars"):
    writer.MetricWriter(tmp_path, progress_bar=False).write(5, {"x": np.zeros(3)})
