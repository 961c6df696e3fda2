"""HF checkpoints in and out: transformers round trips, sharded loading, the convert CLI, memory.

References are independent of the code under test: the logits and state dicts of transformers'
own models, tensors read back with the `safetensors` library, and the peak RSS of a fresh
process measured by the kernel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import hf_fixtures
from cpt_jax import checkpoint as checkpoint_lib
from cpt_jax import sharding
from cpt_jax.models import load_pretrained, prepare_inputs, save_pretrained
from cpt_jax.models import convert
from cpt_jax.models.qwen2_5_vl import params as params_lib
from cpt_jax.train import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGITS_TOL = 1e-5  # float32 weights copied exactly: transformers' logits must agree to rounding
GRID = (1, 8, 8)  # one image of 8 x 8 patches (16 image tokens)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return hf_fixtures.checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(ckpt):
  return load_pretrained(ckpt.path)


def _params(model) -> dict[str, np.ndarray]:
  return {path: np.asarray(v.get_value()) for path, v in params_lib.param_paths(model)}


def _hf_tensors(path) -> dict[str, np.ndarray]:
  """Every tensor of an HF directory, read with the safetensors library."""
  out = {}
  for file in params_lib.checkpoint_files(path):
    out.update({k: v.float().numpy() for k, v in safetensors.torch.load_file(file).items()})
  return out


def _image_inputs(ckpt):
  ids = hf_fixtures.prompt_ids(ckpt, [GRID, "What color is the cube?"])
  input_ids, mask = hf_fixtures.pad_batch([ids], pad_id=0)
  return input_ids, mask, hf_fixtures.random_pixels([GRID]), np.asarray([GRID])


def _assert_same_logits(ckpt, reloaded, *inputs):
  expected = hf_fixtures.hf_logits(ckpt, *inputs)
  got = hf_fixtures.hf_logits(hf_fixtures.Checkpoint(ckpt.path, reloaded, ckpt.tokenizer), *inputs)
  assert np.abs(expected).max() > 1.0  # not a comparison of near-zero numbers
  assert np.abs(got - expected).max() <= LOGITS_TOL


# ------------------------------------------------------------------ HF -> cpt_jax -> HF


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_vl_round_trip_through_transformers(tmp_path_factory, tmp_path, tied):
  # The tied checkpoint is the parity tests' (shared through the session cache).
  ckpt = (hf_fixtures.checkpoint(tmp_path_factory, vision_depth=3, fullatt_block_indexes=(0, 2),
                                 window_size=56, tie_word_embeddings=True, seed=1)
          if tied else hf_fixtures.checkpoint(tmp_path_factory))
  model = load_pretrained(ckpt.path)
  save_pretrained(model, tmp_path, max_shard_size="100KB", tokenizer_dir=ckpt.path)

  with open(tmp_path / "model.safetensors.index.json") as f:
    weight_map = json.load(f)["weight_map"]
  assert len(set(weight_map.values())) > 1
  assert ("lm_head.weight" in weight_map) != tied
  assert (tmp_path / "tokenizer.json").read_bytes() == open(
      f"{ckpt.path}/tokenizer.json", "rb").read()

  reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
  assert reloaded.dtype == torch.float32
  theirs = ckpt.model.state_dict()
  for key, value in reloaded.state_dict().items():
    torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)
  _assert_same_logits(ckpt, reloaded, *_image_inputs(ckpt))
  # ... and our loader reads the sharded index it wrote back to the same parameters.
  again = _params(load_pretrained(tmp_path))
  for path, value in _params(model).items():
    np.testing.assert_array_equal(again[path], value, err_msg=path)


def _tied_qwen2(path, tokenizer) -> hf_fixtures.Checkpoint:
  config = transformers.Qwen2Config(
      vocab_size=hf_fixtures.VOCAB_SIZE, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
  torch.manual_seed(3)
  model = transformers.Qwen2ForCausalLM(config).eval()
  hf_fixtures.randomize_(model, 3)
  model.save_pretrained(path)
  return hf_fixtures.Checkpoint(str(path), model, tokenizer)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_text_only_qwen2_round_trip_through_transformers(tmp_path_factory, tmp_path, tied):
  ckpt = hf_fixtures.qwen2_checkpoint(tmp_path_factory)
  if tied:
    ckpt = _tied_qwen2(tmp_path / "hf", ckpt.tokenizer)
  model = load_pretrained(ckpt.path)
  assert model.config.vision is None and model.config.tie_word_embeddings == tied
  out = tmp_path / "out"
  save_pretrained(model, out)
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
  assert ("lm_head.weight" in safetensors.numpy.load_file(out / "model.safetensors")) != tied

  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
  ids = hf_fixtures.prompt_ids(ckpt, ["How many red spheres are there?"])
  input_ids, mask = hf_fixtures.pad_batch([ids, ids[:7]], pad_id=0)
  with torch.no_grad():
    kw = dict(input_ids=torch.as_tensor(input_ids, dtype=torch.long),
              attention_mask=torch.as_tensor(mask, dtype=torch.long))
    expected, got = ckpt.model(**kw).logits.numpy(), reloaded(**kw).logits.numpy()
  assert np.abs(expected).max() > 1.0
  assert np.abs(got - expected).max() <= LOGITS_TOL


def test_bfloat16_export_is_the_rounded_weights(ckpt, loaded, tmp_path):
  save_pretrained(loaded, tmp_path, dtype=jnp.bfloat16)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  written = safetensors.torch.load_file(tmp_path / "model.safetensors")
  for key, value in ckpt.model.state_dict().items():
    key = params_lib.canonical_hf_key(key)
    assert written[key].dtype == torch.bfloat16
    torch.testing.assert_close(written[key], value.bfloat16(), rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------ sharded loading


@pytest.fixture(scope="module")
def tp_mesh():
  return sharding.make_mesh({"fsdp": 2, "tensor": 4})  # the tiny model has 2 KV heads


@pytest.fixture(scope="module")
def sharded(ckpt, tp_mesh):
  with sharding.use_mesh(tp_mesh):  # loading works inside a mesh context too
    return load_pretrained(ckpt.path, mesh=tp_mesh)


def test_sharded_load_places_each_parameter(loaded, sharded, tp_mesh):
  layer = "language_model.layers.1."
  expected_specs = {
      "language_model.embed_tokens": P("tensor", "fsdp"),  # [vocab, embed]
      "lm_head": P("fsdp", "tensor"),
      "language_model.norm.scale": P(None),
      layer + "self_attn.q_proj.kernel": P("fsdp", "tensor", None),  # 4 heads on tensor=4
      layer + "self_attn.k_proj.kernel": P("fsdp", None, None),  # 2 KV heads: replicated
      layer + "self_attn.v_proj.bias": P(None, None),
      layer + "self_attn.o_proj.kernel": P("tensor", None, "fsdp"),
      layer + "mlp.down_proj.kernel": P("tensor", "fsdp"),
      "visual.blocks.0.attn.qkv.kernel": P("fsdp", None, None, None),  # 2 vision heads
      "visual.merger.fc1.kernel": P("fsdp", "tensor"),
  }
  values = _params(loaded)
  placed = dict(params_lib.param_paths(sharded))
  for path, variable in placed.items():
    array = variable.get_value()
    assert isinstance(array.sharding, NamedSharding) and array.sharding.mesh == tp_mesh, path
    np.testing.assert_array_equal(np.asarray(array), values[path], err_msg=path)
  for path, spec in expected_specs.items():
    assert placed[path].get_value().sharding.spec == spec, path
  assert {d.id for d in placed["lm_head"].get_value().devices()} == set(range(8))


def test_sharded_forward_matches_transformers(ckpt, sharded, tp_mesh):
  input_ids, mask, pixels, grids = _image_inputs(ckpt)
  extra = prepare_inputs(sharded.config, input_ids, mask, grids)
  with sharding.use_mesh(tp_mesh):
    logits = nnx.jit(lambda m, *a: m(a[0], a[1], a[2], position_ids=a[3], vision_inputs=a[4]))(
        sharded, input_ids, mask, pixels, extra["position_ids"], extra["vision_inputs"])
  expected = hf_fixtures.hf_logits(ckpt, input_ids, mask, pixels, grids)
  assert np.abs(np.asarray(logits) - expected).max() <= 1e-4  # the parity tests' tolerance


def test_save_gathers_a_sharded_model(ckpt, sharded, tmp_path):
  save_pretrained(sharded, tmp_path, max_shard_size="200KB")
  written, original = _hf_tensors(tmp_path), _hf_tensors(ckpt.path)
  assert written.keys() == original.keys()
  for key, value in original.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)


# ------------------------------------------------------------------ convert CLI


def test_cli_round_trip_hf_orbax_hf(ckpt, tmp_path):
  orbax_dir, hf_dir = tmp_path / "orbax", tmp_path / "hf"
  convert.main(["hf-to-orbax", "--hf_dir", ckpt.path, "--out", str(orbax_dir)])
  assert sorted(os.listdir(orbax_dir)) == ["0", convert.HF_CONFIG_FILE, convert.HF_FILES_DIR]
  convert.main(["orbax-to-hf", "--orbax_dir", str(orbax_dir), "--out", str(hf_dir),
                "--max_shard_size", "150KB"])
  assert (hf_dir / "model.safetensors.index.json").exists()
  written, original = _hf_tensors(hf_dir), _hf_tensors(ckpt.path)
  assert written.keys() == original.keys()
  for key, value in original.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  assert params_lib.load_config(hf_dir) == params_lib.load_config(ckpt.path)
  assert (hf_dir / "tokenizer.json").read_bytes() == open(
      f"{ckpt.path}/tokenizer.json", "rb").read()


def test_cli_exports_a_training_workdir(ckpt, loaded, tmp_path):
  """A trainer's checkpoint (cpt_jax.checkpoint.Checkpointer) exports to HF at its step."""
  params = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
  trained = jax.tree.map(lambda x: x, params)
  trained["language_model"]["norm"]["scale"] = params["language_model"]["norm"]["scale"] + 1.0
  state = optim.TrainState(step=jnp.int32(7), params=trained, opt_state={"mu": trained},
                           rng=jax.random.PRNGKey(0), skipped=jnp.int32(0))
  ckpts = checkpoint_lib.Checkpointer(tmp_path / "workdir" / "checkpoints", async_save=False,
                                      handle_sigterm=False)
  ckpts.save(7, state)
  ckpts.close()

  with pytest.raises(FileNotFoundError, match="pass --hf_config_from"):
    convert.main(["orbax-to-hf", "--orbax_dir", str(tmp_path / "workdir"), "--out",
                  str(tmp_path / "x")])
  convert.main(["orbax-to-hf", "--orbax_dir", str(tmp_path / "workdir"), "--out",
                str(tmp_path / "hf"), "--hf_config_from", ckpt.path, "--dtype", "bfloat16"])
  written = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
  assert written["model.norm.weight"].dtype == torch.bfloat16
  np.testing.assert_array_equal(
      written["model.norm.weight"].float().numpy(),
      (_hf_tensors(ckpt.path)["model.norm.weight"] + 1.0).astype(jnp.bfloat16).astype(np.float32))
  assert (tmp_path / "hf" / "tokenizer_config.json").exists()


def test_cli_errors_name_the_problem(ckpt, tmp_path_factory, tmp_path):
  with pytest.raises(FileNotFoundError, match="no complete checkpoint steps"):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / convert.HF_CONFIG_FILE).write_text(
        (open(f"{ckpt.path}/config.json").read()))
    convert.orbax_to_hf(tmp_path / "empty", tmp_path / "out")
  orbax_dir = tmp_path / "orbax"
  convert.hf_to_orbax(ckpt.path, orbax_dir)
  with pytest.raises(FileExistsError, match="already holds checkpoint steps"):
    convert.hf_to_orbax(ckpt.path, orbax_dir)
  with pytest.raises(FileNotFoundError, match="step 3 is not in"):
    convert.orbax_to_hf(orbax_dir, tmp_path / "out", step=3)
  text_only = hf_fixtures.qwen2_checkpoint(tmp_path_factory)
  with pytest.raises(ValueError, match=r"unexpected parameters \['visual.blocks.0.attn.proj.bias'"):
    convert.orbax_to_hf(orbax_dir, tmp_path / "out", hf_config_from=text_only.path)


# ------------------------------------------------------------------ clear errors


def _write_checkpoint(path, config_json: dict, tensors: dict[str, np.ndarray]) -> str:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_json, f)
  safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"))
  return str(path)


def test_not_a_qwen_config_is_named(tmp_path):
  llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64}
  with pytest.raises(ValueError, match=r"found model_type='llama', "
                                       r"architectures=\['LlamaForCausalLM'\]"):
    load_pretrained(_write_checkpoint(tmp_path, llama, {"w": np.zeros(2, np.float32)}))


def test_streaming_loader_names_bad_tensors(ckpt, tmp_path):
  tensors = {k: np.array(v) for k, v in params_lib.read_safetensors(
      f"{ckpt.path}/model.safetensors").items()}
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.9.self_attn.q_proj.weight"] = np.zeros((64, 64), np.float32)
  tensors["visual.merger.mlp.2.weight"] = tensors["visual.merger.mlp.2.weight"][:, :-1].copy()
  config_json = json.loads(open(f"{ckpt.path}/config.json").read())
  with pytest.raises(ValueError) as err:
    load_pretrained(_write_checkpoint(tmp_path, config_json, tensors))
  message = str(err.value)
  assert "missing tensors ['model.layers.1.mlp.up_proj.weight']" in message
  assert "unexpected tensors ['model.layers.9.self_attn.q_proj.weight']" in message
  assert "visual.merger.mlp.2.weight: checkpoint shape (64, 127), model expects (64, 128)" \
      in message


def test_index_naming_absent_tensors_is_an_error(loaded, tmp_path):
  save_pretrained(loaded, tmp_path, max_shard_size="100KB")
  index_file = tmp_path / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  weight_map = index["weight_map"]
  weight_map["model.norm.weight"] = next(
      f for f in weight_map.values() if f != weight_map["model.norm.weight"])
  index_file.write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"lists tensors not found in the files it names: "
                                       r"\['model.norm.weight'\]"):
    load_pretrained(tmp_path)


def test_parse_size():
  assert params_lib.parse_size("5GB") == 5 * 10**9
  assert params_lib.parse_size("100KiB") == 102400
  assert params_lib.parse_size(123) == 123
  with pytest.raises(ValueError, match="'5 parsecs' is not a byte count"):
    params_lib.parse_size("5 parsecs")


# ------------------------------------------------------------------ memory

# Decoder-only config of ~125 MiB (float32) in many tensors of <= 4 MiB. Loading must add about
# the model once (on the CPU backend device memory is host memory) plus a few tensors, not the
# model twice (e.g. the whole file mapped at once, or all tensors converted before placing);
# saving a sharded model must add a few tensors, not a host copy of the model.
BIG = dict(vocab_size=2048, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)

_MEASURE = textwrap.dedent("""
    import json, sys, time
    import jax
    from cpt_jax import sharding
    from cpt_jax.models import load_pretrained, save_pretrained

    def rss(field):
      with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    def measure(fn):
      with open("/proc/self/clear_refs", "w") as f:  # restart the peak (VmHWM) from now
        f.write("5")
      before, start = rss("VmRSS"), time.perf_counter()
      out = fn()
      return out, rss("VmHWM") - before, time.perf_counter() - start

    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    jax.device_put(1.0).block_until_ready()
    model, load_growth, load_s = measure(lambda: load_pretrained(sys.argv[1], mesh=mesh))
    _, save_growth, save_s = measure(lambda: save_pretrained(model, sys.argv[2]))
    print(json.dumps(dict(load_growth=load_growth, load_s=load_s, save_growth=save_growth,
                          save_s=save_s)))
""")


def test_loading_and_saving_stream_tensors(tmp_path):
  config = transformers.Qwen2Config(**BIG)
  with torch.device("meta"):
    shapes = {k: tuple(v.shape) for k, v in transformers.Qwen2ForCausalLM(config).state_dict()
              .items()}
  rng = np.random.default_rng(0)
  tensors = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
  model_bytes = sum(t.nbytes for t in tensors.values())
  largest = max(t.nbytes for t in tensors.values())
  path = _write_checkpoint(tmp_path / "in", config.to_dict(), tensors)
  del tensors
  result = subprocess.run([sys.executable, "-c", _MEASURE, path, str(tmp_path / "out")],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": REPO})
  m = json.loads(result.stdout.strip().splitlines()[-1])
  print(f"model {model_bytes / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB; "
        f"load: peak RSS +{m['load_growth'] / 2**20:.0f} MiB, {m['load_s']:.2f} s; "
        f"save: peak RSS +{m['save_growth'] / 2**20:.0f} MiB, {m['save_s']:.2f} s")
  assert m["load_growth"] < model_bytes + 4 * largest + 32 * 2**20
  assert m["save_growth"] < 4 * largest + 32 * 2**20
  assert os.path.getsize(tmp_path / "out" / "model.safetensors") > model_bytes
