"""Rewards and answer grading against hand-written expectations and the paper's regex."""
from __future__ import annotations

import random
import re
import time

import numpy as np
import pytest

from cpt_jax.rl import rewards

# The paper's format rule as the authors' code writes it: the reference for `format_score`.
PAPER_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)

# (text, content of the last closed \boxed{...} or None)
BOXED_CASES = [
    ("\\boxed{42}", "42"),
    ("x \\boxed{1} y \\boxed{2} z", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
    ("\\boxed{}", ""),
    ("\\boxed {7}", "7"),
    ("\\boxed{1} then \\boxed{2", None),  # last box unclosed: truncated, no answer
    ("\\boxed{", None),
    ("no box here", None),
    ("", None),
    ("\\boxed{a}}}", "a"),
    ("}}{{\\boxed{b}", "b"),
    ("\\boxed{日本}", "日本"),
    ("<think>\\boxed{wrong}</think> \\boxed{right}", "right"),
]


@pytest.mark.parametrize("text,expected", BOXED_CASES)
def test_last_boxed(text, expected):
  assert rewards.last_boxed(text) == expected


# (prediction, ground truth, should match)
MATCH_CASES = [
    ("3.0", "3", True),
    ("3", "3.5", False),
    ("1/2", "0.5", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "1/2", True),
    ("\\frac12", "0.5", True),
    ("-0.50", "-1/2", True),
    ("\u22123", "-3", True),  # unicode minus
    ("\uff11\uff12", "12", True),  # full-width digits
    ("1,000", "1000", True),
    ("1e-3", "0.001", True),
    ("(B)", "B", True),
    ("B.", "B", True),
    ("Option B", "B", True),
    ("option (b)", "B", True),
    ("The answer is B", "B", True),
    ("\\text{B}", "B", True),
    ("(C)", "B", False),
    ("Yes.", "yes", True),
    ("  YES  ", "yes", True),
    ("No", "yes", False),
    ("New   York", "new york", True),
    ("the cat", "cat", True),
    ("two", "2", True),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("30\u00b0", "30", True),
    ("12 cm", "12", True),
    ("12\\text{ cm}", "12", True),
    ("50%", "50", True),
    ("$\\frac{3}{4}$", "0.75", True),
    ("x = 5", "5", True),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", True),
    ("8\\sqrt3", "8\\sqrt{3}", True),
    ("x^{2} + 1", "x^2+1", True),
    ("x^2 - 1", "x^2+1", False),
    ("Unanswerable", "unanswerable", True),
    ("don't know", "dont know", True),
    ("", "", False),  # an empty answer never matches
    ("   ", "a", False),
    ("answer", "answer", True),
    ("\\boxed{5}", "5", False),  # graders get extracted answers, not raw boxes
    ("1e999999", "1", False),  # huge exponent: graded as text, no overflow
    ("9" * 5000, "9" * 5000, True),  # past the int-to-str limit: graded as text
]


@pytest.mark.parametrize("prediction,answer,expected", MATCH_CASES)
def test_answers_match(prediction, answer, expected):
  assert rewards.answers_match(prediction, answer) is expected


# (response, expected format score); each is also checked against the paper's regex.
FORMAT_CASES = [
    ("<think>r</think> so \\boxed{1}", 1.0),
    ("<think>\nmulti\nline\n</think>\n\\boxed{1}\nend", 1.0),
    ("<think></think>\\boxed{}", 1.0),
    (" <think>r</think>\\boxed{1}", 0.0),  # must start with <think>
    ("<think>r</think>", 0.0),
    ("\\boxed{1}<think>r</think>", 0.0),
    ("<think>r \\boxed{1}", 0.0),
    ("<think>r</think>\\boxed{1", 0.0),
    ("<think>a</think>b</think>\\boxed{c}", 1.0),
    ("<think></think>", 0.0),
    ("", 0.0),
]


@pytest.mark.parametrize("response,expected", FORMAT_CASES)
def test_format_score(response, expected):
  assert rewards.format_score(response) == expected
  assert float(PAPER_FORMAT.fullmatch(response) is not None) == expected


def test_format_score_equals_paper_regex_on_random_strings():
  rng = random.Random(0)
  pieces = ["<think>", "</think>", "\\boxed{", "}", "{", "x", "\n", " ", "<think", "boxed"]
  for _ in range(3000):
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
    assert rewards.format_score(text) == float(PAPER_FORMAT.fullmatch(text) is not None), text


# (response, answer, task, reward, accuracy, format) for the paper's reward.
COT_CASES = [
    ("<think>2+2</think> The answer is \\boxed{4}.", "4", None, 1.0, 1.0, 1.0),
    ("<think>2+2</think> \\boxed{5}", "4", None, 0.1, 0.0, 1.0),
    ("The answer is \\boxed{4}", "4", None, 0.9, 1.0, 0.0),
    ("4", "4", None, 0.0, 0.0, 0.0),  # no box: accuracy 0 during training
    ("<think>t</think>\\boxed{4", "4", None, 0.0, 0.0, 0.0),
    ("<think>t</think>\\boxed{(B) a cat}", "B", "scienceqa", 1.0, 1.0, 1.0),
    ("<think>t</think>\\boxed{(B) a cat}", "B", None, 0.1, 0.0, 1.0),  # hook is per task
]


@pytest.mark.parametrize("response,answer,task,reward,accuracy,fmt", COT_CASES)
def test_cot_boxed_reward(response, answer, task, reward, accuracy, fmt):
  score = rewards.get_reward("cot_boxed")(response, answer, task)
  assert score == pytest.approx((reward, accuracy, fmt))


def test_no_cot_reward_grades_whole_response():
  no_cot = rewards.get_reward("no_cot")
  assert no_cot("  Paris. ", "paris", None) == (1.0, 1.0, 0.0)
  assert no_cot("It is Paris", "paris", None) == (0.0, 0.0, 0.0)
  assert no_cot("B. a cat", "B", "scienceqa") == (1.0, 1.0, 0.0)


EXTRACT_CASES = [
    ("<think>x</think>\\boxed{ 7 }", None, "7"),
    ("  plain answer \n", None, "plain answer"),
    ("\\boxed{1} and \\boxed{2", None, "\\boxed{1} and \\boxed{2"),  # unclosed: whole response
    ("(B) The cat", "scienceqa", "B"),
    ("B. The cat", "scienceqa", "B"),
    ("B) The cat", "scienceqa", "B"),
    ("(b) the cat", "scienceqa", "B"),
    ("I think the answer is C.", "scienceqa", "C"),
    ("The correct option is (d)", "scienceqa", "D"),
    ("\\boxed{A}", "scienceqa", "A"),
    ("The answer is a cat", "scienceqa", "The answer is a cat"),  # article, not an option
    ("Because it is warm", "scienceqa", "Because it is warm"),
    ("(B) The cat", "textvqa", "(B) The cat"),
]


@pytest.mark.parametrize("response,task,expected", EXTRACT_CASES)
def test_extract_answer(response, task, expected):
  assert rewards.extract_answer(response, task) == expected


def test_score_batch_arrays_and_inputs():
  out = rewards.score_batch(
      [b"<think>a</think>\\boxed{3.0}", "\\boxed{2}", None, np.str_("<think>x</think>\\boxed{B}")],
      np.array(["3", "3", "3", "B"]), np.array(["geometry3k"] * 3 + ["scienceqa"]), "cot_boxed")
  np.testing.assert_allclose(out["reward"], [1.0, 0.0, 0.0, 1.0])
  np.testing.assert_allclose(out["accuracy"], [1.0, 0.0, 0.0, 1.0])
  np.testing.assert_allclose(out["format"], [1.0, 0.0, 0.0, 1.0])
  assert all(v.dtype == np.float32 and v.shape == (4,) for v in out.values())
  assert rewards.score_batch([], [], None, "no_cot")["reward"].shape == (0,)
  single = rewards.score_batch(["B."], ["B"], "scienceqa", "no_cot")
  assert single["accuracy"].tolist() == [1.0]


def test_bad_calls_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown reward 'nope'"):
    rewards.get_reward("nope")
  with pytest.raises(ValueError, match="2 responses but 1 answers"):
    rewards.score_batch(["a", "b"], ["a"], None, "cot_boxed")
  with pytest.raises(ValueError, match="already registered"):
    rewards.register_reward("cot_boxed")(lambda r, a, t: rewards.Score(0.0, 0.0, 0.0))


def test_fuzz_never_raises_and_stays_in_range():
  rng = random.Random(1)
  alphabet = list("{}\\$()[]<>/.,:;-+^_ 0123456789abBxe\n\t%°√π日本\u200b\x00\ud7ff") + [
      "\\boxed{", "\\frac", "<think>", "</think>", "\\text{", "\\sqrt", "Option ", "1/0"]
  responses = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
               for _ in range(1500)]
  answers = [rng.choice(["3", "B", "yes", "1/2", "", "x^2"]) for _ in responses]
  for name in rewards.reward_names():
    out = rewards.score_batch(responses, answers, "scienceqa", name)
    assert np.isfinite(out["reward"]).all()
    assert ((out["reward"] >= 0) & (out["reward"] <= 1)).all()
  for response in responses[:300]:
    rewards.extract_answer(response, "scienceqa")


def test_huge_and_adversarial_responses_are_fast():
  big = "x" * 1_000_000
  adversarial = [
      "<think>" + "</think>" * 100_000,  # many closings, no box: regex would backtrack
      "<think>" + big + "</think>\\boxed{" + "{" * 100_000,  # deeply unclosed
      "\\boxed{" * 50_000 + "7" + "}" * 50_000,  # deeply nested
      big + "\\boxed{" + "1" * 100_000 + "}",
      "(" * 100_000 + "B",
  ]
  start = time.perf_counter()
  results = [rewards.score_batch([r], ["7"], "scienceqa", "cot_boxed")["reward"][0]
             for r in adversarial]
  assert time.perf_counter() - start < 5.0
  assert results[2] == pytest.approx(0.9)  # the last (innermost) box holds "7"
  assert all(0.0 <= r <= 1.0 for r in results)
