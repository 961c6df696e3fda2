"""Prompt formats per task: how a schema example becomes a chat message.

A prompt is the question, the lettered options (if any), the task's answer-style instruction
and, for RFT, an instruction on the output format. Three styles:

- "sft":        LLaVA/CoIN answer style, e.g. "Answer the question using a single word or phrase."
                Used for SFT training and for evaluating SFT models.
- "rft":        answer style + reason inside <think> </think>, final answer inside \\boxed{}
                (the format the reward checks).
- "rft_no_cot": answer style + final answer inside \\boxed{} with no reasoning (the paper's
                "GRPO without chain of thought" ablation; reward = accuracy only).

Tasks register a `PromptFormat`; unknown tasks are an error, so a typo never silently falls
back to a default prompt.
"""
from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Sequence

LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
PHRASE_INSTRUCTION = "Answer the question using a single word or phrase."
UNANSWERABLE_INSTRUCTION = (
    "When the provided information is insufficient, respond with 'Unanswerable'.")
THINK_BOXED_INSTRUCTION = (
    "First think the problem through step by step inside <think> </think> tags, then give the "
    "final answer inside \\boxed{}.")
BOXED_ONLY_INSTRUCTION = (
    "Give only the final answer inside \\boxed{}, without any reasoning.")

STYLES = ("sft", "rft", "rft_no_cot")
_STYLE_SUFFIX = {"sft": None, "rft": THINK_BOXED_INSTRUCTION, "rft_no_cot": BOXED_ONLY_INSTRUCTION}


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How one task is asked.

  Attributes:
    extra_instructions: sentences placed before the answer-style instruction (VizWiz's
      "Unanswerable" hint).
    has_image: False for text-only benchmarks (MMLU-Pro): their stored image is a placeholder
      that the pipeline never shows to the model.
  """
  extra_instructions: tuple[str, ...] = ()
  has_image: bool = True

  def answer_instruction(self, options: Sequence[str]) -> str:
    """Letter instruction for multiple choice, word-or-phrase instruction otherwise."""
    return LETTER_INSTRUCTION if len(options) else PHRASE_INSTRUCTION


_REGISTRY: dict[str, PromptFormat] = {}


def register_prompt(task: str, fmt: PromptFormat) -> None:
  """Registers (or replaces) the prompt format of `task`."""
  _REGISTRY[task] = fmt


def get_prompt(task: str) -> PromptFormat:
  if task not in _REGISTRY:
    raise ValueError(f"no prompt format registered for task {task!r}; known: {sorted(_REGISTRY)}")
  return _REGISTRY[task]


# "general": the synthetic benchmark's held-out set (plays MMMU's part).
for _task in ("scienceqa", "textvqa", "gqa", "geometry3k", "pathvqa", "superclevr", "mmmu", "pope",
              "general"):
  register_prompt(_task, PromptFormat())
register_prompt("vizwiz", PromptFormat(extra_instructions=(UNANSWERABLE_INSTRUCTION,)))
register_prompt("mmlu_pro", PromptFormat(has_image=False))


def format_options(options: Sequence[str]) -> str:
  """'A. first\\nB. second' (LLaVA's ScienceQA layout)."""
  if len(options) > len(string.ascii_uppercase):
    raise ValueError(f"at most 26 options can be lettered, got {len(options)}")
  return "\n".join(f"{letter}. {opt}" for letter, opt in zip(string.ascii_uppercase, options))


def prompt_text(task: str, question: str, options: Sequence[str], style: str) -> str:
  """The user turn's text: question, options, instructions (one per line)."""
  if style not in STYLES:
    raise ValueError(f"unknown prompt style {style!r}; expected one of {STYLES}")
  fmt = get_prompt(task)
  lines = [question.strip()]
  if len(options):
    lines.append(format_options(options))
  lines.extend(fmt.extra_instructions)
  lines.append(fmt.answer_instruction(options))
  if _STYLE_SUFFIX[style]:
    lines.append(_STYLE_SUFFIX[style])
  return "\n".join(lines)


def build_messages(
    task: str, question: str, options: Sequence[str], style: str,
    answer: str | None = None,
) -> list[dict]:
  """Chat messages for `tokenizer.apply_chat_template`: a user turn with an image part (unless
  the task is text-only) and, when `answer` is given, the assistant turn."""
  content: list[dict] = []
  if get_prompt(task).has_image:
    content.append({"type": "image"})
  content.append({"type": "text", "text": prompt_text(task, question, options, style)})
  messages = [{"role": "user", "content": content}]
  if answer is not None:
    messages.append({"role": "assistant", "content": answer})
  return messages


# Instruction sentences that LLaVA/CoIN annotation files append to questions; builders strip
# them so that the style is chosen here, at prompt time.
_KNOWN_INSTRUCTIONS = (LETTER_INSTRUCTION, PHRASE_INSTRUCTION, UNANSWERABLE_INSTRUCTION,
                       THINK_BOXED_INSTRUCTION, BOXED_ONLY_INSTRUCTION)
_OPTION_LINE = re.compile(r"^([A-Z])\. (.*)$")


def strip_instructions(text: str) -> str:
  """Removes '<image>' placeholders and trailing known instruction sentences."""
  text = text.replace("<image>", "").strip()
  changed = True
  while changed:
    changed = False
    for instruction in _KNOWN_INSTRUCTIONS:
      if text.endswith(instruction):
        text = text[: -len(instruction)].rstrip()
        changed = True
  return text


def split_options(text: str) -> tuple[str, list[str]]:
  """Splits trailing 'A. x' / 'B. y' lines (consecutive letters from A) off a question.

  Returns (question, options); options is empty when the text has no such trailing block.
  """
  lines = text.split("\n")
  start = len(lines)
  while start > 0 and _OPTION_LINE.match(lines[start - 1]):
    start -= 1
  letters = [_OPTION_LINE.match(line).group(1) for line in lines[start:]]
  if not letters or letters != list(string.ascii_uppercase[: len(letters)]):
    return text, []
  options = [_OPTION_LINE.match(line).group(2) for line in lines[start:]]
  return "\n".join(lines[:start]).strip(), options
