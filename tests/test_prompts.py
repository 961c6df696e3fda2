from __future__ import annotations

import pytest

from cpt_jax.data import prompts


def test_sft_prompts_follow_llava_coin_wording():
  assert prompts.prompt_text("scienceqa", "Which is red?", ["apple", "sky"], "sft") == (
      "Which is red?\nA. apple\nB. sky\n"
      "Answer with the option's letter from the given choices directly.")
  assert prompts.prompt_text("textvqa", " What brand? ", [], "sft") == (
      "What brand?\nAnswer the question using a single word or phrase.")
  assert prompts.prompt_text("vizwiz", "What is it?", [], "sft") == (
      "What is it?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
      "Answer the question using a single word or phrase.")


def test_rft_styles_add_format_instruction():
  rft = prompts.prompt_text("geometry3k", "Find x.", [], "rft")
  assert rft.startswith("Find x.\nAnswer the question using a single word or phrase.\n")
  assert "<think> </think>" in rft and rft.endswith("\\boxed{}.")
  no_cot = prompts.prompt_text("geometry3k", "Find x.", [], "rft_no_cot")
  assert "<think>" not in no_cot and "\\boxed{}" in no_cot
  with pytest.raises(ValueError, match="unknown prompt style 'cot'"):
    prompts.prompt_text("geometry3k", "Find x.", [], "cot")


def test_messages_have_image_part_unless_text_only():
  msgs = prompts.build_messages("pope", "Is there a cat?", [], "sft", answer="yes")
  assert [m["role"] for m in msgs] == ["user", "assistant"]
  assert msgs[0]["content"][0] == {"type": "image"} and msgs[1]["content"] == "yes"
  text_only = prompts.build_messages("mmlu_pro", "2+2?", ["3", "4"], "rft")
  assert [part["type"] for part in text_only[0]["content"]] == ["text"]
  with pytest.raises(ValueError, match="no prompt format registered for task 'nope'"):
    prompts.build_messages("nope", "q", [], "sft")


def test_strip_and_split_annotation_text():
  text = ("<image>\nWhich?\nContext: c\nA. x\nB. y\n"
          "Answer with the option's letter from the given choices directly.")
  question, options = prompts.split_options(prompts.strip_instructions(text))
  assert question == "Which?\nContext: c" and options == ["x", "y"]
  # Lines that are not a lettered run from A stay in the question.
  assert prompts.split_options("Q\nB. x\nC. y") == ("Q\nB. x\nC. y", [])
