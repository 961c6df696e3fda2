"""cpt_jax: continual post-training of vision-language models in JAX / Flax NNX."""
import os

# XLA:CPU runs matmuls on Eigen rather than YNNPACK (YNNPACK's other fusions stay): on a 2-core
# AVX-512 Xeon the 100m SFT step is 10-15% faster (on an AVX2 EPYC the same within noise; the
# sampler puts dots back on YNNPACK per program: YNN_DOTS). Read when the CPU backend starts
# (other backends ignore it); a ynn_fusion_type of the user's own in XLA_FLAGS wins.
XLA_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
USER_CHOSE_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", "")
if not USER_CHOSE_YNN_FUSIONS:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_CPU_FLAGS}".strip()

# Per-program XLA:CPU options (jax.jit's compiler_options) that put dots back on YNNPACK, with
# its reduction and convolution fusions: faster for the sampler's prefill, and for its decode
# loop on AVX-512 CPUs (cpt_jax.rl.sampler.default_compiler_options).
YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
            "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


def _cpu_has_avx512(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this host's CPU has AVX-512 (Linux: the flags of /proc/cpuinfo; False elsewhere).
  XLA:CPU's YNNPACK and Eigen kernels rank differently with and without it (see
  cpt_jax.rl.sampler.default_compiler_options)."""
  try:
    with open(cpuinfo) as f:
      return any(line.startswith("flags") and " avx512f" in line for line in f)
  except OSError:
    return False


def _cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
  """This host's CPU vendor id (Linux: 'GenuineIntel', 'AuthenticAMD', ...; '' elsewhere)."""
  try:
    with open(cpuinfo) as f:
      return next((line.split(":", 1)[1].strip() for line in f
                   if line.startswith("vendor_id")), "")
  except OSError:
    return ""


CPU_HAS_AVX512 = _cpu_has_avx512()
CPU_VENDOR = _cpu_vendor()

import flax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Parameters carry logical axis names; they are placed on a mesh explicitly by
# `cpt_jax.sharding`, never eagerly when a module is constructed.
flax.config.update("flax_always_shard_variable", False)
