"""cpt_jax.distributed: argument/env resolution, and a real 2-process CPU run on localhost."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cpt_jax import distributed

from _distributed_worker import GLOBAL_BATCH, LENGTH
from _toy_model import make_toy, toy_input_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_distributed_worker.py")
ENV_NAMES = [name for names in distributed.ENV_VARS.values() for name in names]


@pytest.fixture
def fake_jax_init(monkeypatch):
  """Records jax.distributed.initialize calls instead of connecting anywhere."""
  calls = []
  monkeypatch.setattr(distributed, "_initialized", False)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
  for name in ENV_NAMES:
    monkeypatch.delenv(name, raising=False)
  return calls


def test_single_process_is_a_noop(fake_jax_init):
  assert distributed.initialize() == (0, 1)
  assert distributed.initialize(num_processes=1) == (0, 1)
  assert fake_jax_init == []


def test_env_settings_are_passed_once(fake_jax_init, monkeypatch):
  monkeypatch.setenv("COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("PROCESS_ID", "2")
  distributed.initialize()
  distributed.initialize()
  assert fake_jax_init == [(("127.0.0.1:1234", 4, 2),
                            {"local_device_ids": None, "initialization_timeout": 300})]


def test_arguments_override_env(fake_jax_init, monkeypatch):
  monkeypatch.setenv("PROCESS_ID", "2")
  distributed.initialize("127.0.0.1:99", 2, process_id=1)
  assert fake_jax_init[0][0] == ("127.0.0.1:99", 2, 1)


def test_tpu_vm_uses_jax_auto_detection(fake_jax_init, monkeypatch):
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
  distributed.initialize()
  assert fake_jax_init == [((), {"initialization_timeout": 300})]


@pytest.mark.parametrize("env, message", [
    ({"NUM_PROCESSES": "2"}, r"missing \['coordinator_address', 'process_id'\].*COORDINATOR_ADDRESS"),
    ({"COORDINATOR_ADDRESS": "127.0.0.1:1", "PROCESS_ID": "0"}, r"missing \['num_processes'\]"),
    ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"}, "0 <= process_id < num_processes"),
    ({"NUM_PROCESSES": "two"}, "NUM_PROCESSES='two' is not an integer"),
    ({"NUM_PROCESSES": "1", "PROCESS_ID": "1"}, "it must be 0"),
])
def test_bad_settings_raise(fake_jax_init, monkeypatch, env, message):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=message):
    distributed.initialize()
  assert fake_jax_init == []


def _free_loopback_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_cpu_processes_match_single_process(tmp_path):
  port = _free_loopback_port()
  procs = []
  try:
    for index in range(2):
      env = {
          **os.environ,
          "PYTHONPATH": REPO,
          "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
          "COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
          "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",  # loopback only
          "NUM_PROCESSES": "2",
          "PROCESS_ID": str(index),
      }
      procs.append(subprocess.Popen([sys.executable, WORKER, str(tmp_path)], env=env, cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]

  infos = [json.loads((tmp_path / f"info{i}.json").read_text()) for i in range(2)]
  for i, info in enumerate(infos):
    assert info["process"] == [i, 2]
    assert info["devices"] == [2, 4]
    assert info["batch_shape"] == [GLOBAL_BATCH, LENGTH]  # global, from 4 local rows each
    # embed [64, 32] on (fsdp=2, tensor=2): each process holds 2 of the 4 blocks.
    assert info["embed_local_shards"] == 2
    assert info["embed_shard_shape"] == [32, 16]
  model, ids = make_toy(), toy_input_ids(GLOBAL_BATCH, LENGTH)
  expected = np.asarray(jax.jit(lambda x: model(x))(ids))
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=1e-5, atol=1e-5)
