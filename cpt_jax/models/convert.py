"""Hugging Face checkpoint directory <-> Orbax checkpoint of the parameters.

  python -m cpt_jax.models.convert hf-to-orbax --hf_dir HF --out ORBAX [--dtype float32]
  python -m cpt_jax.models.convert orbax-to-hf --orbax_dir ORBAX --out HF [--hf_config_from HF0]
      [--step N] [--dtype bfloat16] [--max_shard_size 5GB] [--tokenizer_dir TOK]

An Orbax checkpoint here has the layout of the trainer's (cpt_jax.checkpoint): a
CheckpointManager directory whose step holds a `params` item, the model's parameters as a pure
dict (`nnx.to_pure_dict`). hf-to-orbax writes step 0 of such a directory plus, beside the steps,
the source's config.json (`hf_config.json`) and its tokenizer files (`hf_files/`), so the
directory is self-describing. orbax-to-hf reads such a directory, a trainer's
`<workdir>/checkpoints`, or a workdir itself (newest step unless --step); a trainer's
directories hold no HF config, so name the HF checkpoint the run started from with
--hf_config_from (its tokenizer files are copied too).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cpt_jax import checkpoint as checkpoint_lib
from cpt_jax.models.qwen2_5_vl import params as params_lib
from cpt_jax.models.qwen2_5_vl.config import ModelConfig

HF_CONFIG_FILE = "hf_config.json"
HF_FILES_DIR = "hf_files"
PARAMS_ITEM = "params"  # the item name cpt_jax.checkpoint.Checkpointer saves weights under
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def hf_to_orbax(hf_dir: str | os.PathLike, out: str | os.PathLike, *,
                param_dtype=jnp.float32) -> str:
  """Converts an HF checkpoint directory into an Orbax checkpoint directory (step 0)."""
  hf_dir, out = os.fspath(hf_dir), os.fspath(out)
  model = params_lib.load_pretrained(hf_dir, param_dtype=param_dtype)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.CheckpointManager(checkpoint_lib.absolute(out), options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False)) as manager:
    if manager.all_steps():
      raise FileExistsError(f"{out!r} already holds checkpoint steps {manager.all_steps()}")
    manager.save(0, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params)}))
  shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(out, HF_CONFIG_FILE))
  if any(os.path.isfile(os.path.join(hf_dir, n)) for n in params_lib.TOKENIZER_FILES):
    params_lib.copy_tokenizer_files(hf_dir, os.path.join(out, HF_FILES_DIR))
  return out


def _checkpoint_dir(orbax_dir: str) -> str:
  """The CheckpointManager directory: `orbax_dir`, or `orbax_dir/checkpoints` (a workdir)."""
  nested = os.path.join(orbax_dir, "checkpoints")
  return nested if os.path.isdir(nested) else orbax_dir


def _hf_config(checkpoint_dir: str, hf_config_from: str | None) -> dict:
  if hf_config_from is not None:
    file = os.path.join(hf_config_from, "config.json")
  else:
    file = os.path.join(checkpoint_dir, HF_CONFIG_FILE)
    if not os.path.exists(file):
      raise FileNotFoundError(
          f"{checkpoint_dir!r} has no {HF_CONFIG_FILE} (hf-to-orbax writes one; a training "
          "workdir does not): pass --hf_config_from with the HF checkpoint the run started from")
  if not os.path.exists(file):
    raise FileNotFoundError(f"no config.json in {hf_config_from!r}")
  with open(file) as f:
    hf = json.load(f)
  params_lib.check_hf_config(hf, file)
  return hf


def _stored_params(checkpoint_dir: str, step: int | None) -> tuple[int, dict[str, tuple]]:
  """(step, {'a.b.c': (shape, dtype)}) of the params item of `step` (default: the newest)."""
  with ocp.CheckpointManager(checkpoint_lib.absolute(checkpoint_dir),
                              options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    steps = manager.all_steps()
    if step is None:
      step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint steps under {checkpoint_dir!r}")
  if step not in steps:
    raise FileNotFoundError(f"step {step} is not in {checkpoint_dir!r} (steps: {sorted(steps)})")
  item = os.path.join(checkpoint_dir, str(step), PARAMS_ITEM)
  if not os.path.isdir(item):
    raise FileNotFoundError(f"step {step} of {checkpoint_dir!r} has no {PARAMS_ITEM!r} item")
  tree = ocp.StandardCheckpointer().metadata(item).item_metadata.tree
  flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  return step, {_dotted(p): (tuple(m.shape), m.dtype) for p, m in flat}


def _dotted(path) -> str:
  """A pytree key path as 'language_model.layers.0.mlp.up_proj.kernel'."""
  return jax.tree_util.keystr(path, simple=True, separator=".")


def orbax_to_hf(orbax_dir: str | os.PathLike, out: str | os.PathLike, *,
                hf_config_from: str | os.PathLike | None = None, step: int | None = None,
                dtype=None, max_shard_size: int | str = "5GB",
                tokenizer_dir: str | os.PathLike | None = None) -> str:
  """Writes the params of an Orbax checkpoint (hf-to-orbax output or a trainer's) as an HF
  checkpoint directory. `dtype` None keeps the stored dtype."""
  orbax_dir, out = os.fspath(orbax_dir), os.fspath(out)
  hf_config_from = None if hf_config_from is None else os.fspath(hf_config_from)
  checkpoint_dir = _checkpoint_dir(orbax_dir)
  config = ModelConfig.from_hf_dict(_hf_config(checkpoint_dir, hf_config_from))
  step, stored = _stored_params(checkpoint_dir, step)
  model = params_lib.abstract_model(config)
  expected = {path: tuple(v.shape) for path, v in params_lib.param_paths(model)}
  missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
  problems = [f"missing parameters {missing}"] if missing else []
  if unexpected:
    problems.append(f"unexpected parameters {unexpected}")
  problems += [f"{p}: stored shape {stored[p][0]}, config gives {shape}"
               for p, shape in expected.items() if p in stored and stored[p][0] != shape]
  if problems:
    raise ValueError(f"params of step {step} in {checkpoint_dir!r} do not match the config: " +
                     "; ".join(problems))

  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def target(path, x) -> jax.ShapeDtypeStruct:  # Orbax casts to the target dtype as it reads
    stored_dtype = stored[_dotted(path)][1]
    return jax.ShapeDtypeStruct(x.shape, stored_dtype if dtype is None else np.dtype(dtype),
                                sharding=device)

  state = nnx.state(model, nnx.Param)
  abstract = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, checkpoint_lib.restore_params(checkpoint_dir, abstract, step))
  nnx.update(model, state)
  if tokenizer_dir is None:
    bundled = os.path.join(checkpoint_dir, HF_FILES_DIR)
    tokenizer_dir = hf_config_from or (bundled if os.path.isdir(bundled) else None)
  return params_lib.save_pretrained(model, out, dtype=dtype, max_shard_size=max_shard_size,
                                    tokenizer_dir=tokenizer_dir)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m cpt_jax.models.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  to_orbax = commands.add_parser("hf-to-orbax", help="HF directory -> Orbax checkpoint")
  to_orbax.add_argument("--hf_dir", required=True)
  to_orbax.add_argument("--out", required=True)
  to_orbax.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="parameter dtype stored (float32: the trainer's master weights)")
  to_hf = commands.add_parser("orbax-to-hf", help="Orbax checkpoint -> HF directory")
  to_hf.add_argument("--orbax_dir", required=True,
                     help="hf-to-orbax output, a trainer's checkpoints dir, or its workdir")
  to_hf.add_argument("--out", required=True)
  to_hf.add_argument("--hf_config_from", default=None,
                     help="HF checkpoint dir whose config.json (and tokenizer) to use")
  to_hf.add_argument("--step", type=int, default=None, help="default: the newest step")
  to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="dtype written (default: as stored)")
  to_hf.add_argument("--max_shard_size", default="5GB")
  to_hf.add_argument("--tokenizer_dir", default=None,
                     help="default: --hf_config_from, else the tokenizer bundled by hf-to-orbax")
  args = parser.parse_args(argv)
  if args.command == "hf-to-orbax":
    out = hf_to_orbax(args.hf_dir, args.out, param_dtype=DTYPES[args.dtype])
  else:
    out = orbax_to_hf(args.orbax_dir, args.out, hf_config_from=args.hf_config_from,
                      step=args.step, dtype=None if args.dtype is None else DTYPES[args.dtype],
                      max_shard_size=args.max_shard_size, tokenizer_dir=args.tokenizer_dir)
  print(out)


if __name__ == "__main__":
  main(sys.argv[1:])
