from __future__ import annotations

import io
import json
import re

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt_jax.data import builders
from cpt_jax.data import image_processing
from cpt_jax.data import pipeline
from cpt_jax.data import prompts
from cpt_jax.data import tokenizer as tokenizer_lib

PIXELS = dict(min_pixels=56 * 56, max_pixels=84 * 84)  # 4 to 9 merged image tokens per image


def _png(seed: int, size: tuple[int, int]) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


# Fixture truth, independent of the builders and the pipeline: id -> (task, question, answer, png).
PATHVQA = {f"p{i}": ("pathvqa", f"Is tissue {i} normal?", ["yes", "no"][i % 2],
                     _png(i, (60 + 8 * i, 50))) for i in range(10)}
SCIENCEQA = {f"s{i}": ("scienceqa", f"Which color is item {i}?", "AB"[i % 2],
                       _png(100 + i, (56, 70))) for i in range(6)}
TRUTH = {**PATHVQA, **SCIENCEQA}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  corpus = [q + " " + a for _, q, a, _ in TRUTH.values()] * 5 + [
      "Answer the question using a single word or phrase.",
      "Answer with the option's letter from the given choices directly. red blue",
      "You are a helpful assistant. system user assistant <think> </think> \\boxed{}"] * 5
  return tokenizer_lib.train_tokenizer(tmp_path_factory.mktemp("tok"), corpus, vocab_size=400)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """PathVQA from LLaVA JSON + image folder, ScienceQA from a hub-style parquet shard."""
  root = tmp_path_factory.mktemp("real")
  manual = root / "pathvqa"
  (manual / "images").mkdir(parents=True)
  entries = []
  for key, (_, question, answer, png) in PATHVQA.items():
    (manual / "images" / f"{key}.png").write_bytes(png)
    entries.append({"id": key, "image": f"images/{key}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question}\n{prompts.PHRASE_INSTRUCTION}"},
        {"from": "gpt", "value": answer}]})
  (manual / "train.json").write_text(json.dumps(entries))
  builders.build("pathvqa", manual, root / "data")

  manual = root / "scienceqa" / "data"
  manual.mkdir(parents=True)
  pq.write_table(pa.table({
      "id": list(SCIENCEQA),
      "question": [q for _, q, _, _ in SCIENCEQA.values()],
      "choices": [["red", "blue"]] * len(SCIENCEQA),
      "answer": ["AB".index(a) for _, _, a, _ in SCIENCEQA.values()],
      "image": [{"bytes": png, "path": None} for _, _, _, png in SCIENCEQA.values()],
  }), manual / "train-00000-of-00001.parquet")
  builders.build("scienceqa", manual.parent, root / "data")
  return root / "data"


@pytest.fixture(scope="module")
def sources(data_dir):
  return pipeline.open_sources(data_dir, ["pathvqa", "scienceqa"], "train")


@pytest.fixture(scope="module")
def synthetic_sources(tmp_path_factory):
  from cpt_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.build_synthetic(root, ["scienceqa", "superclevr"], train_size=4, test_size=1)
  return pipeline.open_sources(root, ["scienceqa", "superclevr"], "train", kind="synthetic")


def _config(**kwargs) -> pipeline.DataConfig:
  defaults = dict(batch_size=4, max_len=160, length_buckets=(96,), shuffle=False,
                  num_epochs=1, drop_remainder=False, shard_index=0, shard_count=1, **PIXELS)
  return pipeline.DataConfig(**{**defaults, **kwargs})


def _merged_tokens(grids: np.ndarray) -> np.ndarray:
  return grids.prod(axis=-1) // 4


def test_sft_batches_from_real_format(tok, sources):
  batches = list(pipeline.Pipeline(sources, tok, _config(product="sft")))
  assert [len(b["id"]) for b in batches] == [4, 4, 4, 4]
  assert sorted(i for b in batches for i in b["id"]) == sorted(TRUTH)
  pad = tok.convert_tokens_to_ids("<|image_pad|>")
  for b in batches:
    B, S = b["input_ids"].shape
    assert S in (96, 160) and b["input_ids"].dtype == np.int32
    lengths = b["attention_mask"].sum(1)
    assert S == min(s for s in (96, 160) if s >= lengths.max())
    # Right padding: ones then zeros, pad ids outside the mask; loss only on real tokens.
    np.testing.assert_array_equal(b["attention_mask"], np.arange(S)[None] < lengths[:, None])
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()
    assert not (b["loss_mask"] & (1 - b["attention_mask"])).any()
    np.testing.assert_array_equal((b["input_ids"] == pad).sum(1),
                                  _merged_tokens(b["image_grid_thw"]))
    assert b["pixel_values"].shape == (b["image_grid_thw"].prod(-1).sum(), 1176)
    for row in range(B):
      task, question, answer, png = TRUTH[b["id"][row]]
      assert b["task"][row] == task
      # The supervised tokens decode to exactly the answer and the closing <|im_end|>.
      assert tok.decode(b["input_ids"][row][b["loss_mask"][row] == 1]) == answer + "<|im_end|>"
      text = tok.decode(b["input_ids"][row][: lengths[row]])
      assert question in text and text.endswith("<|im_end|>\n")
  # Pixels of the first example equal the image processor applied to the original image.
  first = batches[0]
  task, _, _, png = TRUTH[first["id"][0]]
  expected, grid = image_processing.preprocess_image(Image.open(io.BytesIO(png)), **PIXELS)
  np.testing.assert_array_equal(first["image_grid_thw"][0], grid)
  np.testing.assert_array_equal(first["pixel_values"][: len(expected)], expected)


def test_prompt_batches_from_real_format(tok, sources):
  cfg = _config(product="prompt", prompt_style="rft", fixed_size=(56, 56), max_len=128,
                length_buckets=())
  batches = list(pipeline.Pipeline(sources, tok, cfg))
  for b in batches:
    B, S = b["prompt_ids"].shape
    assert S == 128  # no buckets: always max_len
    lengths = b["prompt_mask"].sum(1)
    # Left padding: zeros then ones.
    np.testing.assert_array_equal(b["prompt_mask"], np.arange(S)[None] >= S - lengths[:, None])
    assert b["pixel_values"].shape == (B * 16, 1176)  # fixed 56x56 -> 4x4 patches per image
    np.testing.assert_array_equal(b["image_grid_thw"], np.tile([1, 4, 4], (B, 1)))
    for row in range(B):
      task, question, answer, _ = TRUTH[b["id"][row]]
      assert (b["answer"][row], b["task"][row]) == (answer, task)
      text = tok.decode(b["prompt_ids"][row][S - lengths[row]:])
      assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
      assert question in text and "<think> </think>" in text
      if task == "scienceqa":
        assert "A. red\nB. blue" in text


def _mrope_reference(ids: np.ndarray, mask: np.ndarray, pad_id: int) -> np.ndarray:
  """[3, S] M-RoPE positions of one row with one image of merged grid 1 x 2 x 2, by hand: text
  counts up; image token k sits at start + (0, k // 2, k % 2); text resumes at start + 2."""
  pos = np.zeros((3, len(ids)), np.int64)
  nxt, image_start, k = 0, None, 0
  for j in np.flatnonzero(mask):
    if ids[j] == pad_id:
      image_start = nxt if k == 0 else image_start
      pos[:, j] = image_start + np.array([0, k // 2, k % 2])
      k += 1
      nxt = image_start + 2
    else:
      pos[:, j] = nxt
      nxt += 1
  return pos


def test_synthetic_source_both_products_with_model_inputs(tok, synthetic_sources):
  from cpt_jax.models.qwen2_5_vl import config as config_lib  # pylint: disable=g-import-not-at-top
  pad = tok.convert_tokens_to_ids("<|image_pad|>")
  model_config = config_lib.ModelConfig.tiny(vocab_size=len(tok), image_token_id=pad)
  for product, style, ids_key, mask_key in (("sft", "sft", "input_ids", "attention_mask"),
                                            ("prompt", "rft", "prompt_ids", "prompt_mask")):
    cfg = _config(product=product, prompt_style=style, fixed_size=(56, 56), max_len=384,
                  on_bad_example="raise")
    batches = list(pipeline.Pipeline(synthetic_sources, tok, cfg, model_config=model_config))
    assert sorted(i for b in batches for i in b["id"]) == sorted(
        f"{t}-train-{i:06d}" for t in ("scienceqa", "superclevr") for i in range(4))
    for b in batches:
      B, S = b[ids_key].shape
      assert b["position_ids"].shape == (3, B, S) and b["position_ids"].dtype == np.int32
      for row in range(B):
        expected = _mrope_reference(b[ids_key][row], b[mask_key][row], pad)
        np.testing.assert_array_equal(b["position_ids"][:, row], expected)
      assert b["vision_inputs"]["rotary_ids"].shape == (B * 16, 2)
      if product == "prompt":
        # Next position after the prompt = real tokens + delta; the 4 image tokens span 2.
        np.testing.assert_array_equal(b["rope_deltas"][:, 0], -2)
      else:
        answers = [tok.decode(r[m == 1]) for r, m in zip(b["input_ids"], b["loss_mask"])]
        assert all(a.endswith("<|im_end|>") and len(a) > len("<|im_end|>") for a in answers)
  with pytest.raises(ValueError, match=r"model image_token_id 5 != tokenizer <\|image_pad\|> id"):
    pipeline.Pipeline(synthetic_sources, tok, _config(),
                      model_config=model_config.replace(image_token_id=5))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("replay_unit", ["example", "batch"])
def test_iterator_state_resumes_exactly(tok, sources, replay_unit):
  cfg = _config(shuffle=True, num_epochs=None, drop_remainder=True, seed=3,
                replay_fraction=0.25, replay_unit=replay_unit)
  data = pipeline.Pipeline(sources[:1], tok, cfg, replay=sources[1:])
  it = iter(data)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what grain's checkpoint handler stores
  expected = _take(it, 4)
  restored = iter(data)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 4), expected)
  assert restored.counts.kept == it.counts.kept


def test_replay_mixing_and_union(tok, sources):
  # Example-level: one replay example in every four, inside batches.
  cfg = _config(shuffle=True, num_epochs=None, replay_fraction=0.25, replay_examples_per_task=2)
  batches = _take(iter(pipeline.Pipeline(sources[:1], tok, cfg, replay=sources[1:])), 8)
  tasks = np.concatenate([b["task"] for b in batches])
  assert (tasks == "scienceqa").sum() == 8 and (tasks == "pathvqa").sum() == 24
  # A replay buffer of 2 examples per earlier task.
  assert len({i for b in batches for i in b["id"] if i.startswith("s")}) == 2
  # Batch-level: whole batches from replay, one in four.
  cfg = _config(shuffle=True, num_epochs=None, replay_fraction=0.25, replay_unit="batch")
  batches = _take(iter(pipeline.Pipeline(sources[:1], tok, cfg, replay=sources[1:])), 8)
  per_batch = [set(b["task"]) for b in batches]
  assert per_batch.count({"scienceqa"}) == 2 and per_batch.count({"pathvqa"}) == 6
  # Multi-task union, one epoch, shuffled: every example exactly once.
  ids = [i for b in pipeline.Pipeline(sources, tok, _config(shuffle=True)) for i in b["id"]]
  assert sorted(ids) == sorted(TRUTH) and ids != sorted(ids)


def test_host_shards_are_disjoint(tok, sources):
  shards = [[i for b in pipeline.Pipeline(sources, tok, _config(shard_index=k, shard_count=3))
             for i in b["id"]] for k in range(3)]
  assert [len(s) for s in shards] == [6, 5, 5]
  assert sorted(sum(shards, [])) == sorted(TRUTH)


def _record(key, *, image=b"", question="Is it red?", **overrides):
  record = {"id": key.encode(), "task": b"pathvqa", "image": image or PATHVQA["p0"][3],
            "question": question.encode(), "options": [], "answer": b"yes"}
  record.update(overrides)
  return {k: v for k, v in record.items() if v is not None}


BAD_RECORDS = [
    _record("good"),
    _record("corrupt", image=b"\x89PNG not really"),
    _record("no_answer", answer=None),
    _record("long", question="very " * 200),
    _record("good2"),
]


def test_bad_examples_skipped_and_counted(tok):
  src = pipeline.TaskSource("pathvqa", BAD_RECORDS, origin="mem.json")
  it = iter(pipeline.Pipeline([src], tok, _config(batch_size=2)))
  batches = list(it)
  assert [list(b["id"]) for b in batches] == [["good", "good2"]]
  assert it.counts.kept == 2 and it.counts.state()["skipped"] == {
      "bad_image/pathvqa": 1, "missing_field/pathvqa": 1, "too_long/pathvqa": 1}


@pytest.mark.parametrize("bad, match", [
    (1, r"bad_image: record id='corrupt' in mem.json \(record 1\): bad image"),
    (2, r"missing_field: record id='no_answer' in mem.json \(record 1\): "
        r"missing fields \['answer'\]"),
    (3, r"too_long: record id='long' in mem.json \(record 1\): \d+ tokens > max_len=160"),
])
def test_bad_examples_raise(tok, bad, match):
  src = pipeline.TaskSource("pathvqa", [BAD_RECORDS[0], BAD_RECORDS[bad]], origin="mem.json")
  with pytest.raises(pipeline.BadExampleError, match=match):
    list(pipeline.Pipeline([src], tok, _config(on_bad_example="raise")))


def test_raise_names_array_record_file(tok, sources):
  with pytest.raises(pipeline.BadExampleError) as info:
    list(pipeline.Pipeline(sources[:1], tok, _config(on_bad_example="raise", max_len=20,
                                                     length_buckets=())))
  match = re.match(r"too_long: record id='(p\d)' in (\S+) \(record (\d+)\): \d+ tokens > "
                   r"max_len=20", str(info.value))
  assert match, str(info.value)
  record_id, path, index = match.groups()
  assert path.endswith("cpt_pathvqa/1.0.0/cpt_pathvqa-train.array_record-00000-of-00001")
  assert sources[0].source[int(index)]["id"].decode() == record_id


def test_text_only_task_has_no_image_tokens(tok):
  # MMLU-Pro stores a placeholder image (see builders); the model never sees it.
  record = _record("m1", task=b"mmlu_pro", question="2 + 2?", options=[b"3", b"4"], answer=b"B")
  batch = next(iter(pipeline.Pipeline([pipeline.TaskSource("mmlu_pro", [record])], tok,
                                      _config(batch_size=1))))
  assert batch["pixel_values"].shape == (0, 1176) and batch["image_grid_thw"].shape == (0, 3)
  text = tok.decode(batch["input_ids"][0][batch["attention_mask"][0] == 1])
  assert "<|vision_start|>" not in text and "A. 3\nB. 4" in text
  assert tok.decode(batch["input_ids"][0][batch["loss_mask"][0] == 1]) == "B<|im_end|>"


def test_config_errors():
  with pytest.raises(ValueError, match="prompt_style must be 'sft'"):
    pipeline.DataConfig(product="sft", prompt_style="rft")
  with pytest.raises(ValueError, match="fixed_size must be"):
    pipeline.DataConfig(fixed_size=(50, 56))
  with pytest.raises(ValueError, match="length_buckets must be in"):
    pipeline.DataConfig(max_len=64, length_buckets=(128,))
  with pytest.raises(ValueError, match="no replay sources"):
    pipeline.Pipeline([pipeline.TaskSource("pathvqa", [])], None,
                      pipeline.DataConfig(replay_fraction=0.5))
