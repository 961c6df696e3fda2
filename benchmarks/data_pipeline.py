r"""Input pipeline throughput (examples/s) with 0 and N preprocessing workers, written as JSON.

Builds a LLaVA/CoIN-format task with the real TFDS builder (smooth random RGB images, JPEG like
the public VQA sets), then times SFT or prompt batches: image decode + resize + patchify,
chat-template tokenisation, padding and batching.

  python benchmarks/data_pipeline.py --workers=0,2 --out=/tmp/data_pipeline.json
  python benchmarks/data_pipeline.py --tokenizer=/ckpt/Qwen2.5-VL-7B-Instruct --image_size=1024x768
"""
from __future__ import annotations

import io
import json
import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from cpt_jax.data import builders
from cpt_jax.data import pipeline
from cpt_jax.data import tokenizer as tokenizer_lib

_OUT = flags.DEFINE_string("out", "data_pipeline.json", "Where to write the JSON results.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Worker-process counts to measure.")
_EXAMPLES = flags.DEFINE_integer("num_examples", 128, "Distinct examples in the built task.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Timed batches per setting.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 2, "Untimed batches (worker start-up).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Examples per batch.")
_IMAGE_SIZE = flags.DEFINE_string("image_size", "640x480", "Source image WxH.")
_PRODUCT = flags.DEFINE_enum("product", "sft", list(pipeline.PRODUCTS), "Batch product.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer dir; default: a tiny trained one.")
# The paper's image budget.
_MIN_PIXELS = flags.DEFINE_integer("min_pixels", 200_704, "smart_resize lower bound.")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", 1_003_520, "smart_resize upper bound.")
_MAX_LEN = flags.DEFINE_integer("max_len", 4096, "Longest sequence kept.")


def _smooth_image(rng: np.random.Generator, width: int, height: int) -> bytes:
  """Low-frequency random colours (compresses like a photo), JPEG-encoded."""
  coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
  img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _build_task(root: str, num_examples: int, width: int, height: int) -> None:
  rng = np.random.default_rng(0)
  manual = os.path.join(root, "manual")
  os.makedirs(os.path.join(manual, "images"))
  entries = []
  for i in range(num_examples):
    with open(os.path.join(manual, "images", f"{i}.jpg"), "wb") as f:
      f.write(_smooth_image(rng, width, height))
    entries.append({"id": str(i), "image": f"images/{i}.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nWhat is written on sign number {i}?"},
        {"from": "gpt", "value": f"answer {i}"}]})
  with open(os.path.join(manual, "train.json"), "w") as f:
    json.dump(entries, f)
  builders.build("textvqa", manual, os.path.join(root, "data"))


def _measure(sources, tok, num_workers: int) -> dict:
  config = pipeline.DataConfig(
      product=_PRODUCT.value, prompt_style="sft" if _PRODUCT.value == "sft" else "rft",
      batch_size=_BATCH_SIZE.value, max_len=_MAX_LEN.value, num_epochs=None,
      min_pixels=_MIN_PIXELS.value, max_pixels=_MAX_PIXELS.value, num_workers=num_workers,
      shard_index=0, shard_count=1)
  start = time.perf_counter()
  iterator = iter(pipeline.Pipeline(sources, tok, config))
  for _ in range(_WARMUP.value):
    batch = next(iterator)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    batch = next(iterator)
  elapsed = time.perf_counter() - start
  iterator.close()
  examples = _BATCHES.value * _BATCH_SIZE.value
  return {
      "num_workers": num_workers,
      "examples_per_s": examples / elapsed,
      "timed_examples": examples,
      "warmup_s": first,
      "image_tokens_per_example": int(batch["image_grid_thw"].prod(-1).mean() // 4),
  }


def main(argv):
  del argv
  width, height = (int(s) for s in _IMAGE_SIZE.value.split("x"))
  with tempfile.TemporaryDirectory() as root:
    _build_task(root, _EXAMPLES.value, width, height)
    if _TOKENIZER.value:
      tok = tokenizer_lib.load_tokenizer(_TOKENIZER.value)
    else:
      corpus = ["What is written on the sign number answer", "Answer the question using a "
                "single word or phrase.", "You are a helpful assistant."] * 20
      tok = tokenizer_lib.train_tokenizer(os.path.join(root, "tok"), corpus, vocab_size=400)
    sources = pipeline.open_sources(os.path.join(root, "data"), ["textvqa"], "train")
    results = [_measure(sources, tok, int(w)) for w in _WORKERS.value]
  report = {
      "benchmark": "data_pipeline",
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
      "settings": {"product": _PRODUCT.value, "batch_size": _BATCH_SIZE.value,
                   "image_size": [width, height], "min_pixels": _MIN_PIXELS.value,
                   "max_pixels": _MAX_PIXELS.value,
                   "tokenizer": _TOKENIZER.value or "tiny trained BPE"},
      "results": results,
  }
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  app.run(main)
