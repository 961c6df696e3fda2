"""GRPO RFT of Qwen2.5-VL-7B-Instruct on one continual post-training task (paper hyperparameters).

  python -m cpt_jax.main \\
      --config=configs/rft_qwen2_5_vl_7b.py:task=scienceqa,ckpt=/ckpt/Qwen2.5-VL-7B-Instruct \\
      --config.data.dir=/data/tfds --workdir=/runs/rft/scienceqa
  # later tasks start from the previous task's run (its weights; the tokenizer of `ckpt`):
  python -m cpt_jax.main \\
      --config=configs/rft_qwen2_5_vl_7b.py:task=textvqa,ckpt=/ckpt/Qwen2.5-VL-7B-Instruct \\
      --config.init.workdir=/runs/rft/scienceqa --config.data.dir=/data/tfds \\
      --workdir=/runs/rft/textvqa
  # RIF-RFT: add rif=offline (the paper) or rif=online (DAPO-style extension).

Paper (Lai et al. 2025, "GRPO as the authors ran it"): n = 8 rollouts per prompt at
temperature 1.0, top_p 0.99; advantages (r - mean) / (std + 1e-6); PPO clip eps 0.2 / 0.3,
dual clip 3.0, one PPO epoch, token-mean loss; KL to the frozen reference as a loss term,
low_var_kl, coefficient 0.01; rollout batch 512 prompts, update batch 128 (4 optimiser steps
per rollout batch); AdamW lr 1e-6, weight decay 0.01, no warmup, gradient clip 1.0; bf16; full
fine-tuning with the vision tower; max prompt 4096 and response 1024 tokens; image pixels
200,704..1,003,520; <think>/\\boxed{} prompt, reward 0.9 accuracy + 0.1 format; evaluation at
temperature 0.5. Epochs per task as in the paper's table.
Not in the paper's facts, chosen here: prompt length buckets, 16 gradient-accumulation
micro-batches per update (8 prompts x 8 responses each), per-block remat 'dots'.
Args: task, ckpt (local HF checkpoint directory), init (an earlier RFT/SFT workdir to start
from instead), rif, no_kl (the ablation), no_cot (the ablation: answer directly, reward =
accuracy of the whole response), runlocal (a 1-iteration shape check).
"""
from configs import common
from configs import rft_synthetic

EPOCHS = {"scienceqa": 5, "textvqa": 1, "vizwiz": 1, "gqa": 1, "geometry3k": 10,
          "pathvqa": 1, "superclevr": 3}


def get_config(arg=None):
  arg = common.parse_arg(arg, task="scienceqa", ckpt="", init="", rif="none", no_kl=False,
                         no_cot=False, runlocal=False)
  if arg.task not in EPOCHS:
    raise ValueError(f"task must be one of {sorted(EPOCHS)}, got {arg.task!r}")
  c = rft_synthetic.rft_config()
  c.data.kind = "real"
  c.data.tasks = (arg.task,)
  c.data.prompt_style = "rft_no_cot" if arg.no_cot else "rft"
  c.data.max_len = 4096
  c.data.length_buckets = (512, 1024, 2048)
  c.data.min_pixels = 200_704
  c.data.max_pixels = 1_003_520
  c.data.num_workers = 8
  c.model.preset = "7b"
  c.model.pretrained = arg.ckpt
  c.model.remat = "dots"
  c.init.workdir = arg.init
  c.compute_dtype = "bfloat16"
  c.rl.update(n=8, temperature=1.0, top_p=0.99, eval_temperature=0.5, max_response_length=1024,
              reward="no_cot" if arg.no_cot else "cot_boxed", advantage="grpo", eps_low=0.2,
              eps_high=0.3, dual_clip=3.0, use_kl=not arg.no_kl, kl_coef=0.01,
              kl_estimator="low_var_kl", loss_agg="token_mean", ppo_epochs=1,
              rollout_batch_size=512, update_batch_size=128)
  c.rif.mode = arg.rif
  c.optim = common.optim_config(lr=1e-6, schedule="constant", warmup_ratio=0.0,
                                weight_decay=0.01, grad_clip_norm=1.0, grad_accum_steps=16)
  c.num_epochs = EPOCHS[arg.task]
  c.eval.batch_size = 64
  c.ckpt.every = 10
  if arg.runlocal:
    c.data.num_workers = 0
    c.rl.update(rollout_batch_size=8, update_batch_size=4, max_response_length=16)
    c.optim.grad_accum_steps = 2
    c.num_iterations = 1
    c.eval.batch_size = 8
    c.eval.max_examples = 8
  return c
