"""Importing cpt_jax: the XLA:CPU flag it sets, the sampler's per-program options, and that a
user's own setting wins over both."""
from __future__ import annotations

import os
import subprocess
import sys

import cpt_jax

SHOW = ("import os, jax, jax.numpy as jnp, cpt_jax\n"
        "print(os.environ['XLA_FLAGS'])\n"
        "hlo = jax.jit(lambda a: a @ a).lower(jnp.ones((64, 64))).compile().as_text()\n"
        "print('__ynn_fusion' in hlo)\n"
        "from cpt_jax.rl import sampler\n"
        "options = sampler.default_compiler_options('cpu', 'prefill')\n"
        "hlo = jax.jit(lambda a: a @ a, compiler_options=options).lower(jnp.ones((64, 64)))\n"
        "print(options == cpt_jax.YNN_DOTS, '__ynn_fusion' in hlo.compile().as_text(),\n"
        "      sampler.default_compiler_options('gpu', 'prefill'),\n"
        "      sampler.default_compiler_options('cpu', 'decode', avx512=True) == options,\n"
        "      sampler.default_compiler_options('cpu', 'decode', avx512=False))\n")


def run(xla_flags: str | None) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True,
                       check=True)
  return out.stdout.split("\n")[:3]


def test_xla_cpu_dot_library_unless_the_user_says_otherwise():
  # Training programs: dots on Eigen; the sampler's prefill, and its decode loop on AVX-512
  # CPUs: on YNNPACK; nothing set on other platforms.
  assert run(None) == [cpt_jax.XLA_CPU_FLAGS, "False", "True True {} True {}"]
  assert run("--xla_backend_optimization_level=0") == [
      f"--xla_backend_optimization_level=0 {cpt_jax.XLA_CPU_FLAGS}", "False",
      "True True {} True {}"]
  # The user's choice, untouched, everywhere: YNNPACK takes the dot, the sampler adds nothing.
  own = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
  assert run(own) == [own, "True", "False True {} True {}"]
  off = "--xla_cpu_experimental_ynn_fusion_type="
  assert run(off) == [off, "False", "False False {} True {}"]


def test_cpu_avx512_flag_is_read_from_cpuinfo(tmp_path):
  with_avx512 = tmp_path / "xeon"
  with_avx512.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512dq\n")
  avx2_only = tmp_path / "epyc"
  avx2_only.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\nbugs\t: avx512f\n")
  assert cpt_jax._cpu_has_avx512(str(with_avx512))
  assert not cpt_jax._cpu_has_avx512(str(avx2_only))
  assert not cpt_jax._cpu_has_avx512(str(tmp_path / "missing"))


def test_cpu_vendor_is_read_from_cpuinfo(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
  assert cpt_jax._cpu_vendor(str(cpuinfo)) == "AuthenticAMD"
  (tmp_path / "bare").write_text("processor\t: 0\n")
  assert cpt_jax._cpu_vendor(str(tmp_path / "bare")) == ""
  assert cpt_jax._cpu_vendor(str(tmp_path / "missing")) == ""
