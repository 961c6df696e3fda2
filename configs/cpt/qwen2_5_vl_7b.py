"""Continual post-training of Qwen2.5-VL-7B-Instruct on the seven tasks (the paper's study).

  python -m cpt_jax.main --config=configs/cpt/qwen2_5_vl_7b.py:method=rft,ckpt=/ckpt/Qwen2.5-VL-7B-Instruct \\
      --config.data.dir=/data/tfds --workdir=gs://bucket/cpt/rft
  python -m cpt_jax.cl.compare gs://bucket/cpt/sft gs://bucket/cpt/rft gs://bucket/cpt/multitask \\
      --out=/tmp/cpt_compare

Args (`:key=value,...`): method ('sft' | 'rft' | 'rif_rft' | 'multitask' | 'rft_no_kl' |
'rft_no_cot' | 'paretocl': adds `config.paretocl`, see configs/cpt/paretocl_qwen2_5_vl_7b.py), ckpt (local HF checkpoint directory), runlocal (2 steps per task, 8 eval
examples: a shape and plumbing check). Paper (papers.md, part A): SFT lr 1e-5 cosine, warmup
0.1, 1 epoch per task; GRPO n = 8, temperature 1.0, top_p 0.99, clip 0.2/0.3, dual clip 3,
k3 KL 0.01, rollout batch 512, update batch 128, AdamW lr 1e-6 wd 0.01, RFT epochs per task
5/1/1/1/10/1/3; bf16; pixels 200,704..1,003,520; prompt 4096, response 1024 tokens; general
sets MMMU, MMLU-Pro, POPE. Chosen: SFT batch 64, greedy evaluation, remat 'dots'.
"""
from configs import common
from configs.cpt import base


def get_config(arg=None):
  arg = common.parse_arg(arg, method="sft", ckpt="", runlocal=False)
  if arg.method not in base.METHODS:
    raise ValueError(f"method must be one of {base.METHODS}, got {arg.method!r}")
  c = base.cpt_config()
  c.method = arg.method
  c.data.kind = "real"
  c.general = ("mmmu", "mmlu_pro", "pope")
  c.data.length_buckets = (1024, 2048, 4096)
  c.data.num_workers = 8
  c.model.preset = "7b"
  c.model.pretrained = arg.ckpt
  c.model.remat = "dots"
  c.compute_dtype = "bfloat16"
  c.eval.batch_size = 128
  c.eval.split_per_task = {"mmmu": "validation"}
  if arg.runlocal:
    c.sft.batch_size = 8
    c.sft.total_steps = 2
    c.rft.rl.update(n=2, rollout_batch_size=4, update_batch_size=2, max_response_length=16)
    c.rft.num_iterations = 1
    c.data.num_workers = 0
    c.eval.update(batch_size=8, max_examples=8, max_new_tokens=16)
    c.log_every = 1
  if arg.method == "paretocl":
    c.paretocl = base.paretocl_config(c.sft.batch_size)
    if arg.runlocal:
      c.paretocl.update(replay_examples_per_task=8, eval_preferences=4)
  return c
