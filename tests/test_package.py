"""Importing cpt_jax: the XLA:CPU flag it sets, and that a user's own setting wins."""
from __future__ import annotations

import os
import subprocess
import sys

import cpt_jax

SHOW = ("import os, jax, jax.numpy as jnp, cpt_jax\n"
        "print(os.environ['XLA_FLAGS'])\n"
        "hlo = jax.jit(lambda a: a @ a).lower(jnp.ones((64, 64))).compile().as_text()\n"
        "print('__ynn_fusion' in hlo)\n")


def run(xla_flags: str | None) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True,
                       check=True)
  return out.stdout.split("\n")[:2]


def test_matmuls_leave_ynnpack_unless_the_user_says_otherwise():
  assert run(None) == [cpt_jax.XLA_CPU_FLAGS, "False"]
  assert run("--xla_backend_optimization_level=0") == [
      f"--xla_backend_optimization_level=0 {cpt_jax.XLA_CPU_FLAGS}", "False"]
  own = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
  assert run(own) == [own, "True"]  # the user's choice, untouched: YNNPACK takes the dot
