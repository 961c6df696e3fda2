"""SFT of Qwen2.5-VL-7B-Instruct on one continual post-training task (paper hyperparameters).

  python -m cpt_jax.main \
      --config=configs/sft_qwen2_5_vl_7b.py:task=scienceqa,ckpt=/ckpt/Qwen2.5-VL-7B-Instruct \
      --config.data.dir=/data/tfds --workdir=/runs/sft/scienceqa

Paper (Lai et al. 2025, SFT baseline): full fine-tuning (vision tower included), AdamW
lr 1e-5, cosine schedule, warmup ratio 0.1, bf16, loss on answer tokens only; epochs per
task as in the paper's table. Not in the paper's facts, chosen here: global batch 64,
weight decay 0, max_len 2048, the RFT runs' image pixel bounds.
Args: task, ckpt (local HF checkpoint directory), runlocal (a 2-step shape check).
"""
from configs import common

EPOCHS = {"scienceqa": 1, "textvqa": 1, "vizwiz": 1, "gqa": 1, "geometry3k": 10,
          "pathvqa": 1, "superclevr": 3}


def get_config(arg=None):
  arg = common.parse_arg(arg, task="scienceqa", ckpt="", runlocal=False)
  if arg.task not in EPOCHS:
    raise ValueError(f"task must be one of {sorted(EPOCHS)}, got {arg.task!r}")
  c = common.sft_config()
  c.data.kind = "real"
  c.data.tasks = (arg.task,)
  c.data.batch_size = 64
  c.data.max_len = 2048
  c.data.length_buckets = (512, 1024, 2048)
  c.data.min_pixels = 200_704
  c.data.max_pixels = 1_003_520
  c.data.num_workers = 8
  c.model.preset = "7b"
  c.model.pretrained = arg.ckpt
  c.model.remat = "dots"
  c.compute_dtype = "bfloat16"
  c.optim = common.optim_config(lr=1e-5, schedule="cosine", warmup_ratio=0.1,
                                weight_decay=0.0, grad_clip_norm=1.0)
  c.num_epochs = EPOCHS[arg.task]
  c.log_every = 10
  c.eval.batch_size = 64
  c.ckpt.every = 200
  if arg.runlocal:
    c.data.batch_size = 8
    c.data.num_workers = 0
    c.eval.batch_size = 8
    c.eval.max_examples = 8
    c.total_steps = 2
    c.log_every = 1
  return c
