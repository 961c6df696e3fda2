"""The uniform example schema every task builder writes (synthetic and real)."""
from __future__ import annotations

import tensorflow_datasets as tfds

# The seven continual post-training tasks, in the papers' training order.
TASKS = ("scienceqa", "textvqa", "vizwiz", "gqa", "geometry3k", "pathvqa", "superclevr")
GENERAL_BENCHMARKS = ("mmmu", "mmlu_pro", "pope")


def features() -> tfds.features.FeaturesDict:
  """image: one RGB image (PNG-encoded); options: empty for open-ended questions."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "task": tfds.features.Text(),
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
      "question": tfds.features.Text(),
      "options": tfds.features.Sequence(tfds.features.Text()),
      "answer": tfds.features.Text(),
  })
