"""Tokenizer loading, and a small Qwen-style byte-level BPE trained on the fly.

Real runs load the tokenizer of a Qwen2.5-VL checkpoint directory with `load_tokenizer`.
Tests and the embedded demo have no hub access, so `train_tokenizer` builds a tiny tokenizer
with Qwen's pre-tokenizer, byte-level alphabet, special tokens and a Qwen2-VL style chat
template, saved so that `transformers.AutoTokenizer` loads it like a real one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
import transformers

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation, spaces.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

# Same rendering as Qwen2-VL's template for text and image content parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(
    out_dir: str | os.PathLike,
    corpus: Iterable[str],
    vocab_size: int = 1024,
) -> transformers.PreTrainedTokenizerBase:
  """Trains a byte-level BPE with Qwen's special tokens on `corpus`, saves it to `out_dir`."""
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - len(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  bpe.train_from_iterator(corpus, trainer=trainer)
  state = bpe.model.__getstate__()
  model_state = json.loads(state)
  vocab = model_state["vocab"]
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]]
  tok = transformers.Qwen2Tokenizer(
      vocab=vocab,
      merges=merges,
      unk_token=None,
      bos_token=None,
      eos_token="<|im_end|>",
      pad_token="<|endoftext|>",
  )
  tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
  tok.chat_template = CHAT_TEMPLATE
  tok.save_pretrained(str(out_dir))
  return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """Loads a tokenizer (with its chat template) from a local directory; never downloads."""
  path = str(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
  tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
  if missing:
    raise ValueError(f"tokenizer at {path!r} lacks Qwen special tokens: {missing}")
  return tok
