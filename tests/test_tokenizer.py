import pytest

from cpt_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  corpus = ["What color is the cube? Answer with a single word.", "<think>a</think> \\boxed{B}"] * 20
  return tokenizer_lib.train_tokenizer(tmp_path_factory.mktemp("tok"), corpus, vocab_size=400)


def test_special_tokens_are_single_ids(tok):
  for t in tokenizer_lib.SPECIAL_TOKENS:
    assert tok.convert_tokens_to_ids(t) != tok.unk_token_id
    assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
  assert tok.eos_token == "<|im_end|>"


def test_chat_template_renders_image_and_roundtrips(tok):
  msgs = [
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
      {"role": "assistant", "content": "red"},
  ]
  text = tok.apply_chat_template(msgs, tokenize=False)
  assert text == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color?<|im_end|>\n"
      "<|im_start|>assistant\nred<|im_end|>\n"
  )
  assert tok.decode(tok(text)["input_ids"]) == text


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
    tokenizer_lib.load_tokenizer(tmp_path / "nope")


def test_chat_template_renderer_is_a_runtime_dependency():
  """transformers renders chat templates with jinja2 but does not require it; the test extra
  (torch) pulls it in, so only the runtime dependency list keeps a plain install working."""
  import pathlib
  import re
  import tomllib
  pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
  deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
  names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in deps}
  assert "jinja2" in names, sorted(names)
