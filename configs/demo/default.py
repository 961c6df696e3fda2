"""The embedded demo: continual SFT vs continual RFT of a small Qwen2.5-VL-shaped model on the
seven synthetic tasks, from one base model (CPU, no download).

  python -m cpt_jax.demo --workdir=/tmp/cpt_demo
  python -m cpt_jax.demo --workdir=/tmp/cpt_demo_mini --config=configs/demo/default.py:mini

Runs of the 'cpt' job (cpt_jax/cl/loop.py), sharing the data, the tokenizer and the model:
  base         multitask SFT on the seven tasks + 'general' (a short base training, so that RFT
               has non-zero rewards); its 'general' accuracy on held-out test images plays
               MMMU / MMLU-Pro's part;
  sft          continual SFT over the seven tasks from base, lr 3e-3, 1 epoch per task;
  rft          continual GRPO from base at a 10x smaller lr (3e-4; the paper: SFT 1e-5 vs
               RFT 1e-6 on a 7B model), 1 epoch of 8 rollouts per prompt per task;
  sft_low_lr   SFT at RFT's lr, and rft_high_lr: RFT at SFT's lr. The two controls separate
               the method from its learning rate;
  paretocl     (optional, not in the default runs) continual ParetoCL from base at SFT's lr,
               1 epoch per task: from task 2 on each batch adds 16 replay rows of the earlier
               tasks (32 kept per task) to SFT's 32 new rows (task 1: 48 new rows); rank-8
               preference-conditioned LM-head update; evaluation with the min-entropy
               preference of 20 per prompt.
The learning rates are ~300x the paper's: the model is small and its base training short.

Answer format (chosen): every run asks with the SFT prompt ("Answer the question using a
single word or phrase.") and the model answers directly; RFT's reward is the accuracy of the
whole response (`no_cot`, the paper's "GRPO without CoT" reward). A model of this size cannot
reason inside <think>, and one prompt and response format for both methods leaves the training
signal as the only difference. `answer=think_boxed` makes every SFT target (base included)
'<think> </think> \\boxed{answer}' and gives RFT the paper's reward (0.9 accuracy + 0.1
format).

Args (`:key=value,...`): mini (seconds-scale sizes, for tests), answer ('direct' |
'think_boxed'), runs ('+'-separated from sft, rft, sft_low_lr, rft_high_lr, rft_no_kl;
default sft+rft+sft_low_lr+rft_high_lr; also paretocl). Any field: --config.runs.rft.rft.optim.lr=1e-4,
--config.base.sft.epochs=4 (a changed run needs a new workdir: runs refuse changed settings).
"""
import ml_collections

from configs import common
from configs.cpt import base as cpt_base

ANSWER_FORMATS = {
    # answer_template of SFT targets, RFT reward, longest sequence, response tokens
    "direct": ("{answer}", "no_cot", 104, 8),
    "think_boxed": ("<think> </think> \\boxed{{answer}}", "cot_boxed", 128, 24),
}
SFT_LR, RFT_LR = 3e-3, 3e-4


def _shared(arg) -> ml_collections.ConfigDict:
  """Data, tokenizer, model and evaluation fields common to all runs."""
  template, _, max_len, new_tokens = ANSWER_FORMATS[arg.answer]
  c = cpt_base.cpt_config()
  c.seed = 0
  c.general = ()
  c.data.synthetic = dict(train_size=256, test_size=128, image_size=56, seed=0)
  c.data.update(max_len=max_len, fixed_size=(56, 56), min_pixels=56 * 56, max_pixels=56 * 56)
  c.data.answer_template = template
  c.tokenizer.vocab_size = 512
  c.model.preset = "tiny"
  c.compute_dtype = "float32"
  c.num_devices = 1
  c.sft.batch_size = 32
  c.eval.update(batch_size=64, max_examples=128, max_new_tokens=new_tokens)
  c.log_every = 5
  c.ckpt.update(every=100, keep=1, async_save=False)
  if arg.mini:
    c.data.synthetic = dict(train_size=8, test_size=4, image_size=56, seed=0)
    c.data.max_len = 224  # the mini tokenizer's vocabulary is small: longer prompts
    c.tokenizer.vocab_size = 320
    c.sft.batch_size = 4
    c.eval.update(batch_size=4, max_examples=4)
    c.log_every = 1
    c.report_every_stage = False  # plots cost about a second each on a small CPU
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, mini=False, answer="direct",
                         runs="sft+rft+sft_low_lr+rft_high_lr")
  if arg.answer not in ANSWER_FORMATS:
    raise ValueError(f"answer must be one of {sorted(ANSWER_FORMATS)}, got {arg.answer!r}")
  reward = ANSWER_FORMATS[arg.answer][1]

  base = _shared(arg)
  base.method = "multitask"
  base.tasks = (*cpt_base.SEVEN_TASKS, "general")
  base.eval.zero_shot = False  # a random model: nothing to see
  base.sft.epochs = 8.0
  base.sft.optim = common.optim_config(lr=3e-3, schedule="cosine", warmup_ratio=0.05,
                                       weight_decay=0.0, grad_clip_norm=1.0)

  sft = _shared(arg)
  sft.method = "sft"
  sft.general = ("general",)
  sft.sft.epochs = 1.0
  sft.sft.epochs_per_task = {}
  sft.sft.optim = common.optim_config(lr=SFT_LR, schedule="cosine", warmup_ratio=0.1,
                                      weight_decay=0.0, grad_clip_norm=1.0)

  rft = _shared(arg)
  rft.method = "rft"
  rft.general = ("general",)
  rft.rft.prompt_style = "sft"
  rft.rft.rl.update(n=8, temperature=1.0, top_p=1.0, max_response_length=rft.eval.max_new_tokens,
                    reward=reward, rollout_batch_size=32, update_batch_size=16)
  # One epoch per task, as SFT: the paper's extra RFT epochs (5/1/1/1/10/1/3) would cost 22
  # epochs of 8 rollouts per prompt, beyond a CPU demo.
  rft.rft.epochs = 1.0
  rft.rft.epochs_per_task = {}
  rft.rft.optim = common.optim_config(lr=RFT_LR, schedule="constant", warmup_ratio=0.0,
                                      weight_decay=0.01, grad_clip_norm=1.0)

  if arg.mini:
    # One SFT program serves base and continual SFT (same optimiser settings, same steps).
    base.sft.update(epochs=1.0, total_steps=2)
    sft.sft.update(total_steps=2, optim=base.sft.optim)
    rft.rft.rl.update(n=2, rollout_batch_size=4, update_batch_size=2)
    rft.rft.num_iterations = 2

  menu = {"sft": sft, "rft": rft}
  menu["sft_low_lr"] = sft.copy_and_resolve_references()
  menu["sft_low_lr"].sft.optim.lr = rft.rft.optim.lr
  menu["rft_high_lr"] = rft.copy_and_resolve_references()
  menu["rft_high_lr"].rft.optim.lr = sft.sft.optim.lr
  menu["rft_no_kl"] = rft.copy_and_resolve_references()
  menu["rft_no_kl"].method = "rft_no_kl"
  menu["paretocl"] = paretocl = sft.copy_and_resolve_references()
  paretocl.method = "paretocl"
  paretocl.paretocl = cpt_base.paretocl_config(sft.sft.batch_size)
  paretocl.paretocl.update(rank=8, hyper_hidden=32, replay_examples_per_task=32)
  paretocl.paretocl.optim = sft.sft.optim.copy_and_resolve_references()
  if arg.mini:
    paretocl.paretocl.update(replay_examples_per_task=4, eval_preferences=4)
  order = tuple(arg.runs.split("+"))
  unknown = [r for r in order if r not in menu]
  if unknown or len(set(order)) != len(order):
    raise ValueError(f"runs must be distinct names from {sorted(menu)}, got {list(order)}")

  c = ml_collections.ConfigDict()
  c.base = base
  c.runs = {label: menu[label] for label in order}  # continual runs from base's final weights
  c.order = order  # run and table order
  c.compilation_cache = True  # persistent XLA cache in <workdir>/jax_cache (reruns start fast)
  return c
