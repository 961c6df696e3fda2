"""SFT of a tiny Qwen2.5-VL on the synthetic benchmark (from scratch; CPU, a few minutes).

  python -m cpt_jax.main --config=configs/sft_synthetic.py --workdir=/tmp/sft_synthetic
  python -m cpt_jax.main --config=configs/sft_synthetic.py:task=gqa,runlocal \
      --workdir=/tmp/sft_smoke

Args (`:key=value,...`): task (a synthetic task, or 'all' for the seven jointly),
runlocal (a few steps on a small split, for smoke tests). Any field: --config.x.y=value.
"""
from configs import common

SEVEN_TASKS = ("scienceqa", "textvqa", "vizwiz", "gqa", "geometry3k", "pathvqa", "superclevr")


def get_config(arg=None):
  arg = common.parse_arg(arg, task="scienceqa", runlocal=False)
  c = common.sft_config()
  c.data.tasks = SEVEN_TASKS if arg.task == "all" else (arg.task,)
  c.data.synthetic = dict(train_size=2000, test_size=200, image_size=56, seed=0)
  c.data.batch_size = 16
  c.data.max_len = 192
  c.data.fixed_size = (56, 56)  # 4 image tokens per example, one compiled shape
  c.tokenizer.vocab_size = 512
  c.model.preset = "tiny"
  # A randomly initialised model needs a far larger step than the paper's fine-tuning lr.
  c.optim = common.optim_config(lr=3e-3, schedule="cosine", warmup_ratio=0.1,
                                weight_decay=0.0, grad_clip_norm=1.0)
  c.num_epochs = 2
  c.log_every = 10
  c.eval.every = 100
  c.eval.batch_size = 16
  c.ckpt.every = 100
  if arg.runlocal:
    c.data.synthetic = dict(train_size=64, test_size=32, image_size=56, seed=0)
    c.tokenizer.vocab_size = 320
    c.data.batch_size = 8
    c.eval.batch_size = 8
    c.total_steps = 6
    c.log_every = 1
    c.eval.every = 0
    c.ckpt.every = 3
  return c
