"""Rule-based rewards and answer grading for RFT and for evaluating any model.

The paper's recipe (papers.md, "Scoring and rewards"; the same rules as EasyR1's math reward):
  * accuracy: content of the last `\\boxed{...}`, normalised, exact match with the ground truth;
  * format: the whole response matches `<think>.*</think>.*\\boxed\\{.*\\}.*` (DOTALL, full match,
    i.e. the response must start with `<think>`);
  * reward = 0.9 * accuracy + 0.1 * format (`cot_boxed`). During training a response without a
    closed `\\boxed{}` has accuracy 0 (EasyR1 grades a missing box as wrong too).
  * `no_cot` (ablation "GRPO without chain of thought"): the whole response is the answer and
    reward = accuracy.
Evaluation (`extract_answer`) is more lenient: the last boxed answer if there is one, else the
whole stripped response, so an SFT model that answers directly is scored fairly.

Rewards and per-task answer hooks live in registries. Nothing here raises on model output: any
string (empty, unclosed braces, huge, odd unicode) gets a reward.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

ACCURACY_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1


class Score(NamedTuple):
  reward: float
  accuracy: float
  format: float


RewardFn = Callable[[str, str, "str | None"], Score]
AnswerHook = Callable[[str], str]

_REWARDS: dict[str, RewardFn] = {}
_ANSWER_HOOKS: dict[str, AnswerHook] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
  """Registers `fn(response, answer, task) -> Score` under `name`."""
  def decorate(fn: RewardFn) -> RewardFn:
    if name in _REWARDS:
      raise ValueError(f"reward {name!r} is already registered")
    _REWARDS[name] = fn
    return fn
  return decorate


def get_reward(name: str) -> RewardFn:
  if name not in _REWARDS:
    raise ValueError(f"unknown reward {name!r}; registered: {sorted(_REWARDS)}")
  return _REWARDS[name]


def reward_names() -> list[str]:
  return sorted(_REWARDS)


def register_answer_hook(task: str) -> Callable[[AnswerHook], AnswerHook]:
  """Registers `hook(answer_text) -> answer_text`, applied to predictions of `task` only."""
  def decorate(fn: AnswerHook) -> AnswerHook:
    if task in _ANSWER_HOOKS:
      raise ValueError(f"answer hook for task {task!r} is already registered")
    _ANSWER_HOOKS[task] = fn
    return fn
  return decorate


def _as_text(value: Any) -> str:
  """Model outputs and TFDS strings arrive as str, bytes or numpy scalars; None means empty."""
  if value is None:
    return ""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  return str(value)


# ----------------------------------------------------------------------------- extraction

_BOXED_START = re.compile(r"\\boxed\s*\{")


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (nested braces balanced); None if absent or unclosed.

  An unclosed last box means the response was cut off before its final answer, so an earlier
  box is not used in its place.
  """
  starts = [m.end() for m in _BOXED_START.finditer(text)]
  if not starts:
    return None
  begin = starts[-1]
  depth = 1
  for pos in range(begin, len(text)):
    char = text[pos]
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return text[begin:pos]
  return None


def format_score(response: str) -> float:
  """1.0 iff `re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", response, re.DOTALL)`.

  Computed with left-most `find`s, which is equivalent (the earliest `</think>` after the opening
  tag leaves the most room for the rest) and linear in the length, unlike the backtracking regex.
  """
  if not response.startswith("<think>"):
    return 0.0
  think_end = response.find("</think>", len("<think>"))
  if think_end < 0:
    return 0.0
  box = response.find("\\boxed{", think_end + len("</think>"))
  if box < 0:
    return 0.0
  return 1.0 if response.find("}", box + len("\\boxed{")) >= 0 else 0.0


def _apply_hook(text: str, task: str | None) -> str:
  hook = _ANSWER_HOOKS.get(task) if task is not None else None
  return hook(text) if hook is not None else text


def extract_answer(response: Any, task: str | None = None) -> str:
  """The answer a response gives, for evaluating any model (SFT or RFT).

  The last boxed content if the response has a closed `\\boxed{}`, else the whole stripped
  response; then the task's answer hook, if one is registered.
  """
  text = _as_text(response)
  boxed = last_boxed(text)
  return _apply_hook((boxed if boxed is not None else text).strip(), task)


# ----------------------------------------------------------------------------- normalisation

_LATEX_WRAPPERS = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)")
# A fraction's part needs parentheses unless it has no operator ("3", "sqrt(3)", "\\pi").
_SIMPLE_TERM = re.compile(r"^[-+]?[^\s+\-*/^=]+$")
_SQRT_SHORT = re.compile(r"\\sqrt\s*([0-9a-zA-Z])")
_SQRT = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_LATEX_SPACES = re.compile(r"\\[,;:! ]|~")
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\b(?:\s+is\b)?\s*[:=]?\s*(?=\S)")
_OPTION = re.compile(r"^(?:option|choice)?\s*\(?([a-z])\)?\s*[.:)]?$")
_VARIABLE_EQUALS = re.compile(r"^[a-z]\s*=\s*(.+)$")
_OPERATOR_SPACES = re.compile(r"\s*([-+*/^=<>()])\s*")
_TEXT_PUNCT = re.compile(r"[,;:!?\"`]")
_ABBREV_DOTS = re.compile(r"'|(?<!\d)\.|\.(?!\d)")
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# A plain number (optionally with thousands separators, decimals, exponent) or a fraction of two,
# followed by an optional unit: "units-free" grading compares the number only.
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:e[-+]?\d{1,3})?"
_UNITS = (r"%|percent|degrees?|deg|units?|square units|sq units|cm|mm|m|km|in|inch|inches|ft|"
          r"feet|foot|yd|yards?|meters?|metres?|centimeters?|kg|g|s|sec|seconds?|minutes?|hours?")
_NUMBER_WITH_UNIT = re.compile(
    rf"^(?P<num>{_NUMBER})(?:/(?P<den>{_NUMBER}))?\s*(?:(?:{_UNITS})(?:\s*\^?\s*[23])?)?$")
# Longer numeric strings are graded as text: Fraction() on them is slow or hits int limits.
_MAX_NUMBER_CHARS = 64


def _strip_latex(text: str) -> str:
  text = text.replace("\\$", "").replace("$", "")
  for delim in ("\\(", "\\)", "\\[", "\\]", "\\left", "\\right", "\\displaystyle"):
    text = text.replace(delim, "")
  text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
  text = _LATEX_SPACES.sub(" ", text)
  text = _DEGREES.sub("", text)
  # Wrappers and fractions nest (\frac{\text{1}}{2}); unwrap innermost first, to a fixed point.
  for _ in range(8):
    unwrapped = _LATEX_WRAPPERS.sub(r"\1", text)
    unwrapped = _SQRT_SHORT.sub(r"\\sqrt{\1}", unwrapped)
    unwrapped = _SQRT.sub(r"sqrt(\1)", unwrapped)
    unwrapped = _FRAC_SHORT.sub(r"\1/\2", unwrapped)
    unwrapped = _FRAC.sub(_frac_to_slash, unwrapped)
    if unwrapped == text:
      break
    text = unwrapped
  return text.replace("{", "").replace("}", "")


def _frac_to_slash(match: re.Match[str]) -> str:
  num, den = match.group(1).strip(), match.group(2).strip()
  num = num if _SIMPLE_TERM.match(num) else f"({num})"
  den = den if _SIMPLE_TERM.match(den) else f"({den})"
  return f"{num}/{den}"


def _as_number(text: str) -> str | None:
  """Canonical exact form of a number ("3.0", "6/2", "3 cm" -> "3"), else None."""
  if len(text) > _MAX_NUMBER_CHARS:
    return None
  match = _NUMBER_WITH_UNIT.match(text)
  if match is None or not re.search(r"\d", match.group("num")):
    return None
  try:
    value = Fraction(match.group("num").replace(",", ""))
    den = match.group("den")
    if den is not None:
      if not re.search(r"\d", den):
        return None
      den_value = Fraction(den.replace(",", ""))
      if den_value == 0:
        return None
      value /= den_value
  except (ValueError, ZeroDivisionError):
    return None
  return str(value)


def normalize_answer(text: Any) -> str:
  """Canonical form of an answer; two answers match iff their canonical forms are equal.

  Case, whitespace, sentence punctuation, LaTeX wrappers (`\\text{}`, `\\frac{}{}`, `$`,
  degrees), option letters ("(B)", "B.", "Option B" -> "b"), numbers and fractions
  ("3.0", "6/2", "\\frac{6}{2}", "3 cm" -> "3"), number words ("three" -> "3") and articles.
  """
  text = unicodedata.normalize("NFKC", _as_text(text))
  text = text.replace("\u2212", "-").replace("\u2044", "/")
  text = _strip_latex(text).lower()
  text = " ".join(text.split())
  text = _ANSWER_PREFIX.sub("", text).strip()
  text = text.rstrip(".").strip()
  option = _OPTION.match(text)
  if option is not None:
    return option.group(1)
  equation = _VARIABLE_EQUALS.match(text)
  if equation is not None:
    text = equation.group(1).strip()
  number = _as_number(text)
  if number is not None:
    return number
  text = _TEXT_PUNCT.sub(" ", text)
  text = _ABBREV_DOTS.sub("", text)
  text = _OPERATOR_SPACES.sub(r"\1", text)
  words = text.split()
  if len(words) > 1:
    words = [w for w in words if w not in _ARTICLES] or words
  text = " ".join(words)
  text = _NUMBER_WORDS.get(text, text)
  number = _as_number(text)
  return number if number is not None else text


def answers_match(prediction: Any, answer: Any) -> bool:
  """Exact match after normalisation; an empty prediction never matches."""
  pred = normalize_answer(prediction)
  return bool(pred) and pred == normalize_answer(answer)


# ----------------------------------------------------------------------------- rewards

@register_reward("cot_boxed")
def cot_boxed(response: str, answer: str, task: str | None = None) -> Score:
  """0.9 * accuracy(last boxed) + 0.1 * format; no closed box -> accuracy 0."""
  response = _as_text(response)
  fmt = format_score(response)
  boxed = last_boxed(response)
  correct = boxed is not None and answers_match(_apply_hook(boxed.strip(), task), answer)
  accuracy = 1.0 if correct else 0.0
  return Score(ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * fmt, accuracy, fmt)


@register_reward("no_cot")
def no_cot(response: str, answer: str, task: str | None = None) -> Score:
  """The whole stripped response is the answer; reward = accuracy (no format term: 0)."""
  accuracy = 1.0 if answers_match(_apply_hook(_as_text(response).strip(), task), answer) else 0.0
  return Score(accuracy, accuracy, 0.0)


def score_batch(responses: Sequence[Any], answers: Sequence[Any],
                tasks: Sequence[Any] | str | None, reward_name: str) -> dict[str, np.ndarray]:
  """Scores a batch; returns float32 arrays `reward`, `accuracy`, `format`, each [B].

  `tasks` is one task name per response, a single name for all, or None (no answer hooks).
  """
  reward_fn = get_reward(reward_name)
  responses, answers = list(responses), list(answers)
  if len(responses) != len(answers):
    raise ValueError(f"score_batch: {len(responses)} responses but {len(answers)} answers")
  if tasks is None or isinstance(tasks, (str, bytes)):
    tasks = [tasks] * len(responses)
  tasks = list(tasks)
  if len(tasks) != len(responses):
    raise ValueError(f"score_batch: {len(responses)} responses but {len(tasks)} tasks")
  scores = [reward_fn(_as_text(r), _as_text(a), None if t is None else _as_text(t))
            for r, a, t in zip(responses, answers, tasks)]
  table = np.asarray(scores, dtype=np.float32).reshape(len(scores), 3)  # [B, 3]
  return {"reward": table[:, 0], "accuracy": table[:, 1], "format": table[:, 2]}


# ----------------------------------------------------------------------------- answer hooks

_LEADING_OPTION = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Z])\s*[.:)](?:\s|$))")
_STATED_OPTION = re.compile(
    r"(?i:answer|option|choice)\s+(?i:is)\s*:?\s*(?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z]))")


@register_answer_hook("scienceqa")
def scienceqa_letter(text: str) -> str:
  """The option letter from "(B) cat", "B. cat", "The answer is B."; other text unchanged."""
  for pattern in (_LEADING_OPTION, _STATED_OPTION):
    match = pattern.search(text)
    if match is not None:
      return (match.group(1) or match.group(2)).upper()
  return text
