"""Decode-based evaluation for continual post-training: the papers' accuracy on every task.

    evaluator = Evaluator(sources, tokenizer, prompt_config, max_examples=200)
    results = evaluator(sampler_generate(sampler, tokenizer, model_config, batch_size=64))
    results["gqa"].accuracy

Each test prompt gets one decoded response (greedy by default); the answer is the content of
the last `\\boxed{}` or else the whole stripped response (`rl.rewards.extract_answer`, with the
task's answer hook) and is right when it matches the ground truth after normalisation
(`rl.rewards.answers_match`). The same rule scores SFT and RFT models (papers.md, "Scoring and
rewards"). `format` is the paper's format score (`<think>..</think>..\\boxed{}`) of the response.

A `Generate` function maps a prompt batch (cpt_jax.data prompt product) to one response string
per row; tests pass a stub with known outputs, the loop wraps the jitted sampler.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.rl import rewards, rollout

Generate = Callable[[Mapping[str, Any]], Sequence[str]]
# Responses kept per task in the results, to show what a model answers.
NUM_SHOWN = 5


@dataclasses.dataclass
class TaskResult:
  """Scores of one task's test prompts."""
  accuracy: float
  format: float
  num_examples: int
  examples: list[dict[str, str]]  # the first NUM_SHOWN: question id, answer, response

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def grade(response: str, answer: str, task: str) -> bool:
  """True when the response's extracted answer matches `answer` (papers' accuracy)."""
  return rewards.answers_match(rewards.extract_answer(response, task), answer)


def evaluate_batches(generate: Generate, batches: Iterable[Mapping[str, Any]]
                     ) -> dict[str, TaskResult]:
  """Decodes and grades every row of `batches` (prompt batches); results per task."""
  correct: dict[str, list[float]] = {}
  formatted: dict[str, list[float]] = {}
  shown: dict[str, list[dict[str, str]]] = {}
  for batch in batches:
    responses = list(generate(batch))
    rows = len(batch["prompt_ids"])
    if len(responses) != rows:
      raise ValueError(f"generate returned {len(responses)} responses for {rows} prompts")
    for response, answer, task, ident in zip(responses, batch["answer"], batch["task"],
                                             batch["id"]):
      task, answer = str(task), str(answer)
      correct.setdefault(task, []).append(float(grade(response, answer, task)))
      formatted.setdefault(task, []).append(rewards.format_score(response))
      if len(shown.setdefault(task, [])) < NUM_SHOWN:
        shown[task].append({"id": str(ident), "answer": answer, "response": str(response)})
  return {task: TaskResult(accuracy=float(np.mean(correct[task])),
                           format=float(np.mean(formatted[task])),
                           num_examples=len(correct[task]), examples=shown[task])
          for task in correct}


def sampler_generate(sampler, tokenizer, model_config, *, batch_size: int,
                     temperature: float = 0.0, top_p: float = 1.0,
                     key: jax.Array | None = None) -> Generate:
  """A `Generate` over an `rl.sampler.Sampler`: one response per prompt.

  Partial batches are padded to `batch_size` rows (so one program serves every batch) and the
  padding rows dropped. Sampling (temperature > 0) draws with `key`, folded with a batch counter.
  """
  if temperature > 0 and key is None:
    raise ValueError("sampling evaluation (temperature > 0) needs a PRNG key")
  key = jax.random.PRNGKey(0) if key is None else key
  calls = iter(range(1 << 62))

  def generate(batch: Mapping[str, Any]) -> list[str]:
    batch = {k: v for k, v in batch.items() if k not in rollout.DERIVED_KEYS}
    padded, real = rollout.pad_rows(batch, batch_size, model_config)
    out = sampler(padded["prompt_ids"], padded["prompt_mask"],
                  key=jax.random.fold_in(key, next(calls)), num_samples=1,
                  temperature=temperature, top_p=top_p,
                  pixel_values=padded.get("pixel_values"),
                  image_grid_thw=padded.get("image_grid_thw"))
    return rollout.decode_responses(tokenizer, out.tokens, out.lengths, out.done)[:real]

  return generate


class Head:
  """The first `n` records of a random-access source (a fixed evaluation subset)."""

  def __init__(self, source: Any, n: int):
    if n < 1:
      raise ValueError(f"Head needs n >= 1, got {n}")
    self.source = source
    self.n = min(n, len(source))

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < self.n:
      raise IndexError(f"index {index} out of range for {self.n} records")
    return self.source[index]


class Evaluator:
  """Scores a model on fixed test sets, one task at a time.

  Args:
    sources: one `pipeline.TaskSource` per evaluated task (test splits).
    tokenizer: the model's tokenizer.
    config: prompt-product `DataConfig` (prompt_style, max_len, image sizes); its batch_size is
      the evaluation batch; shuffling and epochs are overridden (one ordered pass).
    max_examples: per task, evaluate the first `max_examples` test records (0: all).
  """

  def __init__(self, sources: Sequence[pipeline_lib.TaskSource], tokenizer,
               config: pipeline_lib.DataConfig, *, max_examples: int = 0):
    if config.product != "prompt":
      raise ValueError(f"evaluation needs prompt batches (product='prompt'), got "
                       f"{config.product!r}")
    names = [s.task for s in sources]
    if len(set(names)) != len(names):
      raise ValueError(f"evaluated tasks must be unique, got {names}")
    if max_examples:
      sources = [dataclasses.replace(s, source=Head(s.source, max_examples)) for s in sources]
    self.sources = list(sources)
    self.tokenizer = tokenizer
    self.config = dataclasses.replace(config, shuffle=False, num_epochs=1, drop_remainder=False)

  @property
  def tasks(self) -> list[str]:
    return [s.task for s in self.sources]

  def __call__(self, generate: Generate) -> dict[str, TaskResult]:
    results = {}
    for source in self.sources:
      batches = pipeline_lib.Pipeline([source], self.tokenizer, self.config)
      results.update(evaluate_batches(generate, batches))
      if source.task not in results:
        raise ValueError(f"evaluation of task {source.task!r} got no example (all skipped as "
                         "bad or too long?)")
    return results
