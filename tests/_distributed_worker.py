"""One process of tests/test_distributed.py: joins the others, runs the toy decoder sharded
over the global mesh, and (process 0) saves the gathered logits.

Usage: python tests/_distributed_worker.py OUT_DIR
The parent sets COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID, JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from cpt_jax import distributed, sharding

from _toy_model import make_toy, toy_input_ids

GLOBAL_BATCH, LENGTH = 8, 6


def main(out_dir: str) -> None:
  index, count = distributed.initialize()
  assert distributed.initialize() == (index, count)  # idempotent
  # fsdp spans the two processes (params and batch split across hosts), tensor stays local.
  mesh = sharding.make_mesh({"fsdp": -1, "tensor": 2})
  model = sharding.shard_init(make_toy, mesh)
  local_rows = GLOBAL_BATCH // count
  ids = toy_input_ids(GLOBAL_BATCH, LENGTH)[index * local_rows:(index + 1) * local_rows]
  batch = sharding.shard_batch({"input_ids": ids}, mesh)
  with sharding.use_mesh(mesh):
    logits = nnx.jit(lambda m, x: m(x))(model, batch["input_ids"])  # [B, S, V]
  gathered = multihost_utils.process_allgather(logits, tiled=True)
  if index == 0:
    np.save(os.path.join(out_dir, "logits.npy"), gathered)
  info = {
      "process": [index, count],
      "devices": [jax.local_device_count(), jax.device_count()],
      "batch_shape": list(batch["input_ids"].shape),
      "embed_local_shards": len(model.embed[...].addressable_shards),
      "embed_shard_shape": list(model.embed[...].addressable_shards[0].data.shape),
  }
  with open(os.path.join(out_dir, f"info{index}.json"), "w") as f:
    json.dump(info, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1])
