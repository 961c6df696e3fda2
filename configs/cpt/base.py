"""Fields of the continual post-training job ('cpt', cpt_jax/cl/loop.py); defaults = the paper.

`cpt_config()` is imported by the experiment files next to this one and by configs/demo/.
Paper facts: shared/papers.md, part A (Lai et al. 2025); what is not in them is marked "chosen".
"""
import ml_collections

from configs import common

SEVEN_TASKS = ("scienceqa", "textvqa", "vizwiz", "gqa", "geometry3k", "pathvqa", "superclevr")
METHODS = ("sft", "rft", "rif_rft", "multitask", "rft_no_kl", "rft_no_cot", "paretocl")
# RFT epochs per task (papers.md table); SFT trains 1 epoch on every task.
RFT_EPOCHS = {"scienceqa": 5.0, "geometry3k": 10.0, "superclevr": 3.0}


def cpt_config() -> ml_collections.ConfigDict:
  from cpt_jax import sharding  # pylint: disable=g-import-not-at-top

  c = ml_collections.ConfigDict()
  c.job = "cpt"
  c.method = "sft"              # cpt_jax.cl.loop.METHODS
  c.seed = 0
  c.tasks = SEVEN_TASKS         # the sequence, in training order
  c.general = ()                # held-out sets evaluated before and after (MMMU's part)
  c.data = dict(
      kind="synthetic",         # 'synthetic' (built into `dir`) or 'real' (cpt_jax.data.builders)
      dir="",                   # TFDS data_dir; '' -> <workdir>/data
      synthetic=dict(train_size=3000, test_size=300, image_size=56, seed=0),
      train_examples=0,         # per task, the first N training records (0: all)
      max_len=4096,             # SFT: prompt + answer; RFT and evaluation: prompt
      length_buckets=(),
      min_pixels=200_704, max_pixels=1_003_520,
      fixed_size=(),            # (H, W): one image size (static shapes)
      num_workers=0,
      on_bad_example="skip",
      answer_template="{answer}",  # the SFT target; e.g. '<think> </think> \\boxed{{answer}}'
  )
  c.tokenizer = dict(path="", vocab_size=512, corpus_examples=2000)
  c.model = dict(preset="7b", pretrained="", remat="none", attention_impl="xla")
  c.init = dict(workdir="")     # a run directory (SFT/RFT job or 'cpt') whose final weights start
  c.compute_dtype = "bfloat16"
  c.remat_policy = ""
  c.loss_chunk = 0  # tokens per LM-head + loss chunk (0: all at once)
  c.num_devices = 0             # 0: all devices
  c.sft = dict(
      batch_size=64,            # chosen (global)
      epochs=1.0, epochs_per_task={},
      total_steps=0,            # > 0: steps per stage, overriding epochs
      steps_per_call=1,         # steps per compiled call (a scan over equally shaped batches;
                                # on CPU it saves the per-call temp-buffer allocation)
      optim=common.optim_config(lr=1e-5, schedule="cosine", warmup_ratio=0.1,
                                weight_decay=0.0, grad_clip_norm=1.0),
  )
  c.rft = dict(
      prompt_style="rft",       # 'rft' (<think> + \boxed{}), 'rft_no_cot' or 'sft'
      rl=dict(n=8, temperature=1.0, top_p=0.99, top_k=0, eval_temperature=0.0,
              max_response_length=1024, reward="cot_boxed", advantage="grpo", adv_eps=1e-6,
              eps_low=0.2, eps_high=0.3, dual_clip=3.0, use_kl=True, kl_coef=0.01,
              kl_estimator="low_var_kl", loss_agg="token_mean", ppo_epochs=1,
              rollout_batch_size=512, update_batch_size=128, old_logprobs="recompute",
              cache_growth=128),
      rif=dict(mode="none", drop_all_wrong=True, drop_all_right=False, low=0.01, high=0.99,
               max_batches=8),
      epochs=1.0, epochs_per_task=dict(RFT_EPOCHS),
      num_iterations=0,         # > 0: rollout batches per stage, overriding epochs
      optim=common.optim_config(lr=1e-6, schedule="constant", warmup_ratio=0.0,
                                weight_decay=0.01, grad_clip_norm=1.0),
  )
  c.eval = dict(
      split="test",
      split_per_task={},        # task -> split, where a set has no `split` (MMMU: validation)
      batch_size=64,
      max_examples=0,           # per task (0: the whole test split)
      max_new_tokens=1024,
      temperature=0.0,          # greedy (the paper also reports temperature 0.5)
      prompt_style="",          # '' -> the trainer's ('sft' for SFT, rft.prompt_style for RFT)
      zero_shot=True,           # evaluate the starting model before the first task
  )
  c.report_every_stage = True   # rewrite the report files after every stage (else at the end)
  c.log_every = 10
  c.ckpt = dict(every=200, keep=2, async_save=True)
  c.mesh = sharding.mesh_config()
  return c


def paretocl_config(batch_size: int) -> ml_collections.ConfigDict:
  """`config.paretocl` of method 'paretocl' (cpt_jax.cl.loop.train_paretocl_stage); every value
  is chosen. `batch_size`: the run's new-task rows per step (sft.batch_size).

    rank, hyper_hidden: the low-rank LM-head update and its hypernetwork
      (2 -> hidden -> hidden -> rank), cpt_jax.paretocl.vlm.
    num_preferences, concentration: K preferences per step from Dirichlet(concentration)
      (ParetoCL paper: K = 5, Dirichlet(1, 1)).
    eval_preferences, eval_seed: the fixed test-time preferences (paper: K = 20); each test
      prompt decodes with the one of least first-answer-token entropy.
    replay_batch_size: replay rows added to every step's batch from task 2 on (the paper:
      replay batch = stream batch; here half of it, chosen); the first task's batches have
      as many more new rows instead.
    replay_examples_per_task: each earlier task's buffer, a fixed seeded subset of its training
      set (0: all of it).
    optim: the optimiser of backbone and adapter together (one learning rate; optim has no
      per-group rate); freeze=('base',) trains the adapter alone.
  """
  return ml_collections.ConfigDict(dict(
      rank=16, hyper_hidden=100,
      num_preferences=5, concentration=1.0,
      eval_preferences=20, eval_seed=0,
      replay_batch_size=max(1, batch_size // 2), replay_examples_per_task=1000,
      optim=common.optim_config(lr=1e-5, schedule="cosine", warmup_ratio=0.1,
                                weight_decay=0.0, grad_clip_norm=1.0),
  ))
