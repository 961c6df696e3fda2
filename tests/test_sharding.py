"""cpt_jax.sharding on 8 fake CPU devices (tests/conftest.py)."""
from __future__ import annotations

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from cpt_jax import sharding
from cpt_jax.sharding import (constrain, logical_rules, logical_to_spec, make_mesh, param_shardings,
                              shard_batch, shard_init, shard_model, use_mesh)

from _toy_model import ToyConfig, make_toy, toy_input_ids


def _specs(model_or_state, mesh, rules=None) -> dict[str, P]:
  flat = nnx.to_flat_state(param_shardings(model_or_state, mesh, rules))
  return {".".join(map(str, path)): var.get_value().spec for path, var in flat}


# ------------------------------------------------------------------ mesh


@pytest.mark.parametrize("shape, expected", [
    ({"fsdp": -1}, (1, 8, 1)),
    ({"data": 1, "fsdp": -1, "tensor": 1}, (1, 8, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
    ({"data": -1, "tensor": 4}, (2, 1, 4)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
])
def test_make_mesh_shapes(shape, expected):
  mesh = make_mesh(shape)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == expected
  assert mesh.axis_types == (AxisType.Auto,) * 3


def test_make_mesh_on_given_devices():
  mesh = make_mesh({"tensor": -1}, devices=jax.devices()[:2])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 2}


@pytest.mark.parametrize("shape, message", [
    ({"fsdp": -1, "tensor": -1}, "Only one mesh axis may be -1"),
    ({"fsdp": -1, "tensor": 3}, "do not divide the 8 devices"),
    ({"fsdp": 4}, "needs 4 devices but 8 are given"),
    ({"model": 2, "fsdp": -1}, r"Unknown mesh axes \['model'\]"),
    ({"fsdp": 0}, "sizes are positive ints or -1"),
])
def test_make_mesh_errors(shape, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(shape)


def test_mesh_config_defaults_to_all_fsdp():
  mesh, rules = sharding.mesh_from_config(sharding.mesh_config())
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert rules == sharding.DEFAULT_RULES


# ------------------------------------------------------------------ logical names


def test_logical_to_spec_uses_each_mesh_axis_once():
  assert logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
  assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert logical_to_spec(("batch", None, "heads")) == P(("data", "fsdp"), None, "tensor")


def test_logical_rules_presets_and_context():
  assert logical_to_spec(("embed", "mlp"), "fsdp") == P("fsdp", None)
  assert logical_to_spec(("embed", "mlp"), "tensor") == P(None, "tensor")
  assert logical_to_spec(("embed", "mlp"), "data") == P(None, None)
  with logical_rules("tensor"):
    assert logical_to_spec(("embed", "heads")) == P(None, "tensor")
  assert logical_to_spec(("embed", "heads")) == P("fsdp", "tensor")


@pytest.mark.parametrize("call, message", [
    (lambda: logical_to_spec(("batch", "emb")), "Unknown logical axis 'emb'"),
    (lambda: logical_to_spec(("embed",), "zero3"), "Unknown sharding rules preset 'zero3'"),
    (lambda: logical_to_spec(("embed",), [("embed", "model")]), "names mesh axis 'model'"),
])
def test_logical_name_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_constrain_is_noop_without_mesh_and_checks_rank():
  x = jnp.ones((2, 3))
  assert constrain(x, ("batch", "embed")) is x
  with use_mesh(make_mesh({"fsdp": -1})), pytest.raises(ValueError, match="2 logical axes"):
    jax.jit(lambda y: constrain(y, ("batch", "embed")))(jnp.ones((8, 2, 3)))


def test_constrain_shards_activations():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with use_mesh(mesh):
    y = jax.jit(lambda x: constrain(x * 2, ("batch", "length", "mlp")))(jnp.ones((4, 3, 6)))
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)


# ------------------------------------------------------------------ parameters

CFG = ToyConfig()
FSDP_TENSOR_SPECS = {
    "embed": P("tensor", "fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "norm.scale": P(None),
    **{f"blocks.{i}.{name}": spec for i in range(CFG.layers) for name, spec in {
        "attn_norm.scale": P(None),
        "mlp_norm.scale": P(None),
        "attn.q": P("fsdp", "tensor", None),
        "attn.k": P("fsdp", "tensor", None),
        "attn.v": P("fsdp", "tensor", None),
        "attn.o": P("tensor", None, "fsdp"),
        "up": P("fsdp", "tensor"),
        "down": P("tensor", "fsdp"),
    }.items()},
}


@pytest.fixture(scope="module")
def abstract_toy():
  return nnx.eval_shape(make_toy)


def test_param_specs_fsdp_tensor(abstract_toy):
  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  assert _specs(abstract_toy, mesh) == FSDP_TENSOR_SPECS


def test_param_specs_presets(abstract_toy):
  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  fsdp = _specs(abstract_toy, mesh, "fsdp")
  assert fsdp["blocks.0.attn.q"] == P("fsdp", None, None)
  assert fsdp["blocks.0.attn.o"] == P(None, None, "fsdp")
  assert fsdp["embed"] == P(None, "fsdp")
  tensor = _specs(abstract_toy, mesh, "tensor")
  assert tensor["blocks.0.attn.q"] == P(None, "tensor", None)
  assert tensor["blocks.0.down"] == P("tensor", None)
  assert set(_specs(abstract_toy, mesh, "data").values()) == {P(None), P(None, None), P(None, None, None)}


def test_kv_heads_fewer_than_tensor_axis_are_replicated(abstract_toy, caplog):
  mesh = make_mesh({"fsdp": 2, "tensor": 4})  # 2 KV heads, tensor=4
  sharding._logged_notes.clear()
  with caplog.at_level(logging.INFO, logger="cpt_jax.sharding"):
    specs = _specs(abstract_toy, mesh)
    _specs(abstract_toy, mesh)
  assert specs["blocks.0.attn.k"] == P("fsdp", None, None)
  assert specs["blocks.1.attn.v"] == P("fsdp", None, None)
  assert specs["blocks.0.attn.q"] == P("fsdp", "tensor", None)  # 4 query heads do divide
  notes = [r.getMessage() for r in caplog.records if "blocks.0.attn.k" in r.getMessage()]
  assert notes == ["blocks.0.attn.k: dim 1 (kv_heads=2) not divisible by mesh axes {'tensor': 4}; "
                   "replicated along them."]


def test_param_names_rank_mismatch_is_an_error():
  bad = nnx.Dict(w=nnx.Param(jnp.ones((2, 3)), out_sharding=("embed",)))
  with pytest.raises(ValueError, match=r"w: 1 logical axes \('embed',\) for shape \(2, 3\)"):
    param_shardings(bad, make_mesh({"fsdp": -1}))


def test_sharding_names_spelling_is_read():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # flax 0.12 prefers out_sharding=
    holder = nnx.Dict(w=nnx.Param(jnp.ones((8, 4)), sharding_names=("embed", "mlp")))
  assert _specs(holder, make_mesh({"fsdp": 4, "tensor": 2})) == {"w": P("fsdp", "tensor")}


@pytest.fixture(scope="module")
def reference():
  model = make_toy()
  ids = toy_input_ids(8, 6)
  return model, ids, np.asarray(jax.jit(lambda x: model(x))(ids))  # one device, no mesh


@pytest.fixture(scope="module")
def tp_mesh():
  return make_mesh({"fsdp": 2, "tensor": 4})


@pytest.fixture(scope="module")
def sharded_toy(tp_mesh):
  with use_mesh(make_mesh({"fsdp": -1})):  # an outer mesh context must not matter
    return shard_init(make_toy, tp_mesh)


def test_shard_init_places_params_and_keeps_values(sharded_toy, tp_mesh, reference):
  plain, _, _ = reference
  assert sharded_toy.blocks[0].attn.q[...].sharding == NamedSharding(tp_mesh, P("fsdp", "tensor", None))
  assert sharded_toy.embed[...].sharding == NamedSharding(tp_mesh, P("tensor", "fsdp"))
  # One device holds a 1/8 block of the [64, 32] embedding.
  assert sharded_toy.embed[...].addressable_shards[0].data.shape == (16, 16)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded_toy)),
                               nnx.to_flat_state(nnx.state(plain))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_sharded_forward_matches_single_device(sharded_toy, tp_mesh, reference):
  _, ids, expected = reference
  with use_mesh(tp_mesh):
    logits = nnx.jit(lambda m, x: m(x))(sharded_toy, shard_batch({"ids": ids}, tp_mesh)["ids"])
  assert logits.sharding.is_equivalent_to(NamedSharding(tp_mesh, P(("data", "fsdp"), None, "tensor")), 3)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_shard_model_moves_existing_model(tp_mesh):
  model = make_toy(seed=3)
  before = np.asarray(model.blocks[1].down[...])
  assert shard_model(model, tp_mesh, "tensor") is model
  assert model.blocks[1].down[...].sharding == NamedSharding(tp_mesh, P("tensor", None))
  assert model.lm_head[...].sharding == NamedSharding(tp_mesh, P(None, "tensor"))
  np.testing.assert_array_equal(np.asarray(model.blocks[1].down[...]), before)


# ------------------------------------------------------------------ batches


def test_shard_batch_layout():
  mesh = make_mesh({"data": 2, "fsdp": 4})
  batch = {
      "input_ids": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
      "position_ids": np.arange(3 * 8 * 5, dtype=np.int32).reshape(3, 8, 5),
      "image_grid_thw": np.ones((3, 3), np.int32),  # 3 images: no axis divides -> replicated
      "pairs": np.ones((2, 4), np.float32),  # 2 rows: split over 'data' only
      "task": np.array(["a"] * 8),
      "vision_inputs": {"window_index": np.arange(16)},
  }
  out = shard_batch(batch, mesh)
  assert out["input_ids"].sharding.spec == P(("data", "fsdp"), None)
  assert out["position_ids"].sharding.spec == P(None, ("data", "fsdp"), None)
  assert out["image_grid_thw"].sharding.spec == P(None, None)
  assert out["pairs"].sharding.spec == P("data", None)
  assert out["vision_inputs"]["window_index"].sharding.spec == P(("data", "fsdp"))
  assert isinstance(out["task"], np.ndarray)
  # Device k of the flattened (data, fsdp) grid holds example row k.
  for shard in out["input_ids"].addressable_shards:
    row = list(mesh.devices.flat).index(shard.device)
    np.testing.assert_array_equal(np.asarray(shard.data), batch["input_ids"][row:row + 1])
  np.testing.assert_array_equal(np.asarray(out["position_ids"]), batch["position_ids"])
  replicated = shard_batch(batch, mesh, batch_dims={"input_ids": None})["input_ids"]
  assert replicated.sharding.spec == P()
  assert sharding.batch_sharding(mesh, ndim=3, batch_dim=1).spec == P(None, ("data", "fsdp"), None)


# ------------------------------------------------------------------ the real model (tiny config)


@pytest.fixture(scope="module")
def qwen_tiny():
  """Tiny Qwen2.5-VL with host-random weights (skips compiling ~60 jax.random inits)."""
  from cpt_jax.models import ModelConfig, init_from_config
  config = ModelConfig.tiny()
  graphdef, state = nnx.split(nnx.eval_shape(lambda: init_from_config(config, 0)))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), state)
  ids = rng.integers(0, config.text.vocab_size, (8, 12), dtype=np.int32)
  model = nnx.merge(graphdef, state)
  return model, ids, np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))


def test_qwen_text_params_land_as_intended(qwen_tiny, tp_mesh):
  specs = _specs(qwen_tiny[0], tp_mesh)  # hidden 64, 4 heads, 2 KV heads, mlp 128, vocab 512
  layer = "language_model.layers.0."
  assert {name: specs[name] for name in [
      "language_model.embed_tokens", "lm_head", "language_model.norm.scale",
      layer + "self_attn.q_proj.kernel", layer + "self_attn.q_proj.bias",
      layer + "self_attn.k_proj.kernel", layer + "self_attn.v_proj.bias",
      layer + "self_attn.o_proj.kernel", layer + "mlp.gate_proj.kernel",
      layer + "mlp.down_proj.kernel"]} == {
          "language_model.embed_tokens": P("tensor", "fsdp"),
          "lm_head": P("fsdp", "tensor"),
          "language_model.norm.scale": P(None),
          layer + "self_attn.q_proj.kernel": P("fsdp", "tensor", None),
          layer + "self_attn.q_proj.bias": P("tensor", None),
          layer + "self_attn.k_proj.kernel": P("fsdp", None, None),  # 2 KV heads on tensor=4
          layer + "self_attn.v_proj.bias": P(None, None),
          layer + "self_attn.o_proj.kernel": P("tensor", None, "fsdp"),
          layer + "mlp.gate_proj.kernel": P("fsdp", "tensor"),
          layer + "mlp.down_proj.kernel": P("tensor", "fsdp"),
      }


def test_qwen_sharded_forward_matches_single_device(qwen_tiny, tp_mesh):
  model, ids, expected = qwen_tiny
  sharded = shard_model(nnx.clone(model), tp_mesh)
  specs = _specs(model, tp_mesh)
  for path, var in nnx.to_flat_state(nnx.state(sharded)):
    assert var.get_value().sharding == NamedSharding(tp_mesh, specs[".".join(map(str, path))])
  with use_mesh(tp_mesh):
    logits = nnx.jit(lambda m, x: m(x))(sharded, shard_batch({"ids": ids}, tp_mesh)["ids"])
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
