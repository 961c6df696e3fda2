from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt_jax.data import builders
from cpt_jax.data import schema


def _png(color: tuple[int, int, int], size=(30, 20)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="PNG")
  return buf.getvalue()


def _decode(record) -> dict:
  """Record from load_split -> python values; the image decoded with PIL."""
  out = {k: (v.decode() if isinstance(v, bytes) and k != "image" else v) for k, v in record.items()}
  out["options"] = [o.decode() for o in record["options"]]
  out["image"] = np.asarray(Image.open(io.BytesIO(record["image"])))
  return out


def _write_llava(manual, split, entries, images: dict[str, bytes]):
  (manual / "imgs").mkdir(parents=True, exist_ok=True)
  for name, data in images.items():
    (manual / "imgs" / name).write_bytes(data)
  (manual / f"{split}.json").write_text(json.dumps(entries))


def test_llava_json_scienceqa(tmp_path):
  manual = tmp_path / "manual"
  entries = [
      {"id": "q1", "image": "imgs/a.png", "conversations": [
          {"from": "human", "value": (
              "<image>\nWhich is red?\nContext: look.\nA. apple\nB. sky\n"
              "Answer with the option's letter from the given choices directly.")},
          {"from": "gpt", "value": "A"}]},
      {"id": "q2", "image": "imgs/b.png", "conversations": [
          {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "blue"},
          {"from": "human", "value": "Is it a square?"}, {"from": "gpt", "value": "yes"}]},
  ]
  _write_llava(manual, "train", entries, {"a.png": _png((255, 0, 0)), "b.png": _png((0, 0, 255))})
  (manual / "test.jsonl").write_text(json.dumps(entries[0]) + "\n")
  builder = builders.build("scienceqa", manual, tmp_path / "data")
  assert set(builder.info.splits.keys()) == {"train", "test"}
  assert builder.info.splits["test"].num_examples == 1
  src = builders.load_split(tmp_path / "data", "scienceqa", "train")
  records = sorted((_decode(src[i]) for i in range(len(src))), key=lambda r: r["id"])
  assert [r["id"] for r in records] == ["q1", "q2#0", "q2#1"]
  q1 = records[0]
  assert q1["question"] == "Which is red?\nContext: look."
  assert q1["options"] == ["apple", "sky"] and q1["answer"] == "A" and q1["task"] == "scienceqa"
  assert q1["image"].shape == (20, 30, 3) and tuple(q1["image"][0, 0]) == (255, 0, 0)
  assert records[1]["question"] == "What color?" and records[1]["options"] == []
  assert records[2]["answer"] == "yes" and tuple(records[2]["image"][5, 5]) == (0, 0, 255)


def _image_struct(data):
  return {"bytes": data, "path": "x.png"}


def test_parquet_shards_per_task_columns(tmp_path):
  # ScienceQA hub layout: int answer index, list of choices, hint as context, text-only rows.
  manual = tmp_path / "sqa"
  (manual / "data").mkdir(parents=True)
  table = pa.table({
      "image": [_image_struct(_png((0, 255, 0))), None],
      "question": ["Which is green?", "Text-only question?"],
      "choices": [["leaf", "sun", "sea"], ["a", "b"]],
      "answer": [0, 1],
      "hint": ["", ""],
  })
  pq.write_table(table, manual / "data" / "test-00000-of-00001.parquet")
  builders.build("scienceqa", manual, tmp_path / "data")
  src = builders.load_split(tmp_path / "data", "scienceqa", "test")
  assert len(src) == 1  # the image subset only
  r = _decode(src[0])
  assert r["answer"] == "A" and r["options"] == ["leaf", "sun", "sea"]
  assert r["id"] == "test-00000-of-00001.parquet:0"

  # TextVQA: annotator answers -> majority; two shards of one split.
  manual = tmp_path / "textvqa"
  manual.mkdir()
  for shard, qid in enumerate(["t1", "t2"]):
    pq.write_table(pa.table({
        "question_id": [qid], "question": ["What brand?"],
        "answers": [["nike", "adidas", "nike"]], "image": [_image_struct(_png((9, 9, 9)))]}),
        manual / f"validation-0000{shard}-of-00002.parquet")
  builders.build("textvqa", manual, tmp_path / "data")
  src = builders.load_split(tmp_path / "data", "textvqa", "validation")
  assert sorted(_decode(src[i])["id"] for i in range(2)) == ["t1", "t2"]
  assert {_decode(src[i])["answer"] for i in range(2)} == {"nike"}

  # MMMU: options as a Python-literal string, image_1 column, letter answer.
  manual = tmp_path / "mmmu"
  manual.mkdir()
  pq.write_table(pa.table({
      "id": ["m1"], "question": ["<image 1> Which?"], "options": ["['x', 'y']"],
      "answer": ["B"], "image_1": [_image_struct(_png((1, 2, 3)))]}),
      manual / "validation-00000-of-00001.parquet")
  builders.build("mmmu", manual, tmp_path / "data")
  r = _decode(builders.load_split(tmp_path / "data", "mmmu", "validation")[0])
  assert r["options"] == ["x", "y"] and r["answer"] == "B"

  # MMLU-Pro: text only -> black 28x28 placeholder image.
  manual = tmp_path / "mmlu_pro"
  manual.mkdir()
  pq.write_table(pa.table({
      "question_id": [7], "question": ["2+2?"], "options": [["3", "4"]], "answer": ["B"]}),
      manual / "test-00000-of-00001.parquet")
  builders.build("mmlu_pro", manual, tmp_path / "data")
  r = _decode(builders.load_split(tmp_path / "data", "mmlu_pro", "test")[0])
  assert r["id"] == "7" and r["image"].shape == (28, 28, 3) and not r["image"].any()

  # Super-CLEVR style: <answer> tags in the solution column.
  manual = tmp_path / "superclevr"
  manual.mkdir()
  pq.write_table(pa.table({
      "problem": ["How many cubes?"], "solution": ["<answer> 3 </answer>"],
      "image": [_image_struct(_png((5, 5, 5)))]}), manual / "train.parquet")
  builders.build("superclevr", manual, tmp_path / "data")
  r = _decode(builders.load_split(tmp_path / "data", "superclevr", "train")[0])
  assert r["question"] == "How many cubes?" and r["answer"] == "3"


def test_one_builder_per_task_and_benchmark():
  assert set(builders.BUILDERS) == set(schema.TASKS + schema.GENERAL_BENCHMARKS)
  for task, cls in builders.BUILDERS.items():
    assert cls.name == f"cpt_{task}" and cls.TASK == task and task in builders.COLUMN_MAPS


def test_missing_columns_and_unknown_task(tmp_path):
  manual = tmp_path / "m"
  manual.mkdir()
  pq.write_table(pa.table({"question": ["q"], "image": [_image_struct(_png((0, 0, 0)))]}),
                 manual / "test.parquet")
  with pytest.raises(ValueError, match=r"no column for \['answer'\] of task 'pathvqa'"):
    builders.build("pathvqa", manual, tmp_path / "data")
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    builders.build("nope", manual, tmp_path / "data")


def test_bad_image_raise_or_skip(tmp_path):
  manual = tmp_path / "manual"
  entries = [
      {"id": "good", "image": "imgs/g.png", "conversations": [
          {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "a"}]},
      {"id": "corrupt", "image": "imgs/c.png", "conversations": [
          {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "a"}]},
      {"id": "missing", "image": "imgs/none.png", "conversations": [
          {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "a"}]},
  ]
  _write_llava(manual, "train", entries, {"g.png": _png((1, 1, 1)), "c.png": b"\x89PNG garbage"})
  with pytest.raises(builders.BadExampleError,
                     match=r"record id='corrupt' in .*train.json: bad image"):
    builders.build("pathvqa", manual, tmp_path / "raise")
  builder = builders.build("pathvqa", manual, tmp_path / "skip", on_bad_example="skip")
  assert len(builder.skipped) == 2
  assert "id='missing'" in builder.skipped[1] and "image file not found" in builder.skipped[1]
  src = builders.load_split(tmp_path / "skip", "pathvqa", "train")
  assert len(src) == 1 and src[0]["id"] == b"good"
