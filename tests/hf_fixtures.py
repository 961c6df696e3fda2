"""Tiny random Hugging Face Qwen2.5-VL checkpoints and inputs for parity tests (torch: tests only).

`checkpoint(tmp_path_factory, **arch)` builds a Qwen2_5_VLForConditionalGeneration with every
weight, bias and norm scale randomised, a tokenizer trained by `train_tokenizer`, and saves
both with save_pretrained into one directory. Results are cached per architecture for the
whole session, so test modules that ask for the same one share it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import transformers

from cpt_jax.data import tokenizer as tokenizer_lib

CORPUS = [
    "What color is the cube? Answer with a single word.",
    "How many red spheres are there in the picture?",
    "<think>The cube is red.</think> \\boxed{red}",
    "Answer with the option's letter from the given choices directly.",
] * 10
VOCAB_SIZE = 320
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch_size * patch_size**2
MERGE = 2


@dataclasses.dataclass
class Checkpoint:
  path: str
  model: transformers.PreTrainedModel  # Qwen2_5_VLForConditionalGeneration or Qwen2ForCausalLM
  tokenizer: transformers.PreTrainedTokenizerBase

  @property
  def image_token_id(self) -> int:
    return self.tokenizer.convert_tokens_to_ids(tokenizer_lib.IMAGE_PAD)


_CACHE: dict[tuple, Checkpoint] = {}


def checkpoint(tmp_path_factory, *, vision_depth: int = 2,
               fullatt_block_indexes: tuple[int, ...] = (1,), window_size: int = 112,
               tie_word_embeddings: bool = False, seed: int = 0) -> Checkpoint:
  key = (vision_depth, tuple(fullatt_block_indexes), window_size, tie_word_embeddings, seed)
  if key not in _CACHE:
    path = tmp_path_factory.mktemp("hf_qwen2_5_vl")
    tok = tokenizer_lib.train_tokenizer(path, CORPUS, vocab_size=VOCAB_SIZE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in tokenizer_lib.SPECIAL_TOKENS}
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
            bos_token_id=None, eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(
            depth=vision_depth, hidden_size=32, intermediate_size=48, num_heads=2,
            out_hidden_size=64, window_size=window_size,
            fullatt_block_indexes=list(fullatt_block_indexes)),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    _CACHE[key] = Checkpoint(str(path), model, tok)
  return _CACHE[key]


def qwen2_checkpoint(tmp_path_factory, seed: int = 2) -> Checkpoint:
  """A text-only Qwen2ForCausalLM of the same decoder size (what text benchmarks load)."""
  key = ("qwen2", seed)
  if key not in _CACHE:
    path = tmp_path_factory.mktemp("hf_qwen2")
    tok = tokenizer_lib.train_tokenizer(path, CORPUS, vocab_size=VOCAB_SIZE)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=4096, tie_word_embeddings=False,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    _CACHE[key] = Checkpoint(str(path), model, tok)
  return _CACHE[key]


def randomize_(model: torch.nn.Module, seed: int) -> None:
  """Weights ~ N(0, 1/fan_in) (embeddings: 1/hidden), biases ~ N(0, 0.1^2), norm scales
  ~ 1 + N(0, 0.1^2): logits of order one, and every tensor (biases included) moves them."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("bias"):
        p.copy_(0.1 * noise)
      elif p.ndim == 1:
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(noise / np.sqrt(p[0].numel()))


def random_pixels(grids, seed: int = 0) -> np.ndarray:
  """pixel_values [sum(t*h*w), C*T*P*P] float32 for patch grids [I, 3]."""
  n = int(np.prod(np.asarray(grids), axis=-1).sum())
  return np.random.default_rng(seed).standard_normal((n, PATCH_DIM), dtype=np.float32)


def prompt_ids(ckpt: Checkpoint, parts: list) -> list[int]:
  """Chat-templated user turn (with generation prompt) from parts: str = text, (t, h, w) = an
  image of that patch grid, expanded to t*h*w/4 `<|image_pad|>` tokens."""
  content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"}
             for p in parts]
  ids = ckpt.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                           add_generation_prompt=True, tokenize=True)
  if isinstance(ids, dict) or hasattr(ids, "keys"):
    ids = ids["input_ids"]
  counts = iter([int(np.prod(p)) // MERGE**2 for p in parts if not isinstance(p, str)])
  out = []
  for i in ids:
    out.extend([i] * next(counts) if i == ckpt.image_token_id else [i])
  return out


def pad_batch(rows: list[list[int]], pad_id: int, side: str = "left"):
  """Pads token rows to one length -> (input_ids [B, S] int32, attention_mask [B, S] int32)."""
  length = max(len(r) for r in rows)
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for b, r in enumerate(rows):
    sl = slice(length - len(r), length) if side == "left" else slice(0, len(r))
    ids[b, sl], mask[b, sl] = r, 1
  return ids, mask


def hf_inputs(ckpt: Checkpoint, input_ids, attention_mask=None, pixel_values=None,
              image_grid_thw=None) -> dict:
  """Torch kwargs for the HF model; mm_token_type_ids lets it compute M-RoPE positions."""
  ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
  kw = dict(input_ids=ids, mm_token_type_ids=(ids == ckpt.image_token_id).int())
  if attention_mask is not None:
    kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
  if pixel_values is not None:
    kw["pixel_values"] = torch.as_tensor(pixel_values)
    kw["image_grid_thw"] = torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.long)
  return kw


def hf_logits(ckpt: Checkpoint, *args) -> np.ndarray:
  with torch.no_grad():
    return ckpt.model(**hf_inputs(ckpt, *args)).logits.float().numpy()
