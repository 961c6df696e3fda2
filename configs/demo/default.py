"""The embedded demo: continual SFT vs continual RFT of a small Qwen2.5-VL-shaped model on the
seven synthetic tasks, from one base model (CPU, no download).

  python -m cpt_jax.demo --workdir=/tmp/cpt_demo
  python -m cpt_jax.demo --workdir=/tmp/cpt_demo_mini --config=configs/demo/default.py:mini

Three runs of the 'cpt' job (cpt_jax/cl/loop.py) share the data, the tokenizer and the model:
  base   multitask SFT on all seven tasks + 'general' (a short base training, so every task has
         some skill and RFT has non-zero rewards); its 'general' skill on held-out test images
         plays MMMU / MMLU-Pro's part;
  sft    continual SFT over the seven tasks, from base;
  rft    continual GRPO over the seven tasks, from base.

Answer format (chosen): every run asks with the SFT prompt ("Answer the question using a
single word or phrase.") and the model answers directly; RFT's reward is the accuracy of the
whole response (`no_cot`, the paper's "GRPO without CoT" reward). A model of this size cannot
reason inside <think>, and one prompt and response format for both methods leaves the training
signal as the only difference. `answer=think_boxed` makes every SFT target
'<think> </think> \\boxed{answer}' and gives RFT the paper's reward (0.9 accuracy + 0.1
format), so the base model learns to emit the paper's format.

Args (`:key=value,...`): mini (seconds-scale sizes, for tests), answer ('direct' |
'think_boxed'). Any field: --config.runs.rft.rft.optim.lr=1e-4, --config.base.sft.epochs=4.
"""
import ml_collections

from configs import common
from configs.cpt import base as cpt_base

ANSWER_FORMATS = {
    # answer_template of SFT targets, RFT reward
    "direct": ("{answer}", "no_cot"),
    "think_boxed": ("<think> </think> \\boxed{{answer}}", "cot_boxed"),
}


def _shared(arg) -> ml_collections.ConfigDict:
  """Data, tokenizer, model and evaluation fields common to the three runs."""
  c = cpt_base.cpt_config()
  c.seed = 0
  c.general = ()
  c.data.synthetic = dict(train_size=256, test_size=64, image_size=56, seed=0)
  c.data.update(max_len=104, fixed_size=(56, 56), min_pixels=56 * 56, max_pixels=56 * 56)
  c.data.answer_template = ANSWER_FORMATS[arg.answer][0]
  c.tokenizer.vocab_size = 512
  c.model.preset = "tiny"
  c.compute_dtype = "float32"
  c.num_devices = 1
  c.sft.batch_size = 32
  c.eval.update(batch_size=64, max_examples=64, max_new_tokens=8 if arg.answer == "direct"
                else 16)
  c.log_every = 5
  c.ckpt.update(every=100, keep=1, async_save=False)
  if arg.mini:
    c.data.synthetic = dict(train_size=8, test_size=4, image_size=56, seed=0)
    c.data.max_len = 224  # the mini tokenizer's vocabulary is small: longer prompts
    c.tokenizer.vocab_size = 320
    c.sft.batch_size = 4
    c.eval.update(batch_size=4, max_examples=4)
    c.log_every = 1
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, mini=False, answer="direct")
  if arg.answer not in ANSWER_FORMATS:
    raise ValueError(f"answer must be one of {sorted(ANSWER_FORMATS)}, got {arg.answer!r}")
  template, reward = ANSWER_FORMATS[arg.answer]

  base = _shared(arg)
  base.method = "multitask"
  base.tasks = (*cpt_base.SEVEN_TASKS, "general")
  base.eval.zero_shot = False  # a random model: nothing to see
  base.sft.epochs = 6.0
  base.sft.optim = common.optim_config(lr=3e-3, schedule="cosine", warmup_ratio=0.05,
                                       weight_decay=0.0, grad_clip_norm=1.0)

  sft = _shared(arg)
  sft.method = "sft"
  sft.general = ("general",)
  sft.sft.epochs = 1.0
  sft.sft.epochs_per_task = {}
  sft.sft.optim = common.optim_config(lr=1e-3, schedule="cosine", warmup_ratio=0.1,
                                      weight_decay=0.0, grad_clip_norm=1.0)

  rft = _shared(arg)
  rft.method = "rft"
  rft.general = ("general",)
  rft.rft.prompt_style = "sft"
  rft.rft.rl.update(n=8, temperature=1.0, top_p=1.0, max_response_length=rft.eval.max_new_tokens,
                    reward=reward, rollout_batch_size=32, update_batch_size=16)
  # The paper's RFT epochs per task (5/1/1/1/10/1/3) would cost 22 epochs of 8 rollouts per
  # prompt; the demo keeps their order of magnitude relative to SFT but caps them.
  rft.rft.epochs = 1.0
  rft.rft.epochs_per_task = {"scienceqa": 2.0, "geometry3k": 3.0, "superclevr": 2.0}
  rft.rft.optim = common.optim_config(lr=1e-4, schedule="constant", warmup_ratio=0.0,
                                      weight_decay=0.01, grad_clip_norm=1.0)

  if arg.mini:
    # One SFT program serves base and continual SFT (same optimiser settings, same steps).
    base.sft.update(epochs=1.0, total_steps=2)
    sft.sft.update(total_steps=2, optim=base.sft.optim)
    rft.rft.rl.update(n=2, rollout_batch_size=4, update_batch_size=2)
    rft.rft.num_iterations = 2
    rft.rft.epochs_per_task = {}

  c = ml_collections.ConfigDict()
  c.base = base
  c.runs = dict(sft=sft, rft=rft)  # from base's final weights
  c.order = ("sft", "rft")  # run and table order
  c.compilation_cache = True  # persistent XLA cache in <workdir>/jax_cache (reruns start fast)
  return c
