"""GRPO RFT of a tiny Qwen2.5-VL on the synthetic benchmark (CPU, minutes).

  # SFT first (the RFT job needs a model that already gets some answers right), then RFT:
  python -m cpt_jax.main --config=configs/sft_synthetic.py:task=pathvqa --workdir=/tmp/sft_pathvqa
  python -m cpt_jax.main --config=configs/rft_synthetic.py:task=pathvqa,init=/tmp/sft_pathvqa \\
      --workdir=/tmp/rft_pathvqa
  # RIF-RFT: add rif=offline (or rif=online) to the config args.

Args (`:key=value,...`): task, init (an SFT/RFT workdir to start from; '' = random init),
rif ('none' | 'offline' | 'online'), runlocal (a few iterations on a small split).
A tiny model trained on the SFT prompts answers directly, so this config asks in the SFT style
and grades the whole response (`reward='no_cot'`); `configs/rft_qwen2_5_vl_7b.py` uses the
paper's <think>/\\boxed{} prompt and reward. `rft_config()` holds every field of the RFT job.
"""
import ml_collections

from configs import common

SEVEN_TASKS = ("scienceqa", "textvqa", "vizwiz", "gqa", "geometry3k", "pathvqa", "superclevr")


def rft_config() -> ml_collections.ConfigDict:
  """The RFT job's fields (cpt_jax/train/rft.py), defaults = the paper's GRPO runs."""
  from cpt_jax import sharding  # pylint: disable=g-import-not-at-top

  c = ml_collections.ConfigDict()
  c.job = "rft"
  c.seed = 0  # model init, data order, rollout keys
  c.data = dict(
      kind="synthetic",      # 'synthetic' (built into `dir` on first use) or 'real'
      dir="",                # TFDS data_dir; '' -> <workdir>/data
      tasks=("scienceqa",),
      synthetic=dict(train_size=3000, test_size=300, image_size=56, seed=0),
      prompt_style="rft",    # 'rft' (<think> + \boxed{}), 'rft_no_cot' or 'sft'
      max_len=4096,          # max prompt tokens (longer prompts are skipped and counted)
      length_buckets=(),     # prompt lengths to pad to; each compiles once
      min_pixels=200_704, max_pixels=1_003_520,
      fixed_size=(),         # (H, W): resize every image to it (static shapes)
      num_workers=0,
      on_bad_example="skip",
  )
  c.tokenizer = dict(path="", vocab_size=512, corpus_examples=2000)  # as in the SFT job
  c.model = dict(preset="tiny", pretrained="", remat="none", attention_impl="xla")
  c.init = dict(workdir="")  # an SFT/RFT workdir: its final weights and tokenizer start RFT
  c.compute_dtype = "float32"
  c.remat_policy = ""
  c.loss_chunk = 0  # tokens per LM-head + log-prob chunk (0: all at once)
  c.rl = dict(                # cpt_jax.rl.grpo.GRPOConfig; the optimiser is `optim`
      n=8, temperature=1.0, top_p=0.99,
      top_k=0,                # 0: off
      eval_temperature=0.5,   # 0: greedy
      max_response_length=1024,
      reward="cot_boxed",     # 'cot_boxed' (0.9 acc + 0.1 format) or 'no_cot' (accuracy)
      advantage="grpo", adv_eps=1e-6,
      eps_low=0.2, eps_high=0.3,
      dual_clip=3.0,          # 0: off
      use_kl=True, kl_coef=0.01, kl_estimator="low_var_kl",
      loss_agg="token_mean",
      ppo_epochs=1,
      rollout_batch_size=512,  # prompts per rollout batch (x n responses)
      update_batch_size=128,   # prompts per optimiser step
      old_logprobs="recompute",  # pi_old: 'recompute' (full forward) or 'sampler'
      cache_growth=128,        # rollout KV cache grows by >= this many slots (0: one cache)
  )
  c.rif = dict(
      mode="none",            # 'none' | 'offline' (before the task) | 'online' (per batch)
      drop_all_wrong=True, drop_all_right=False,  # offline
      low=0.01, high=0.99,    # online: keep groups with low < mean accuracy < high
      max_batches=8,          # online: rollout batches one update may draw (0: unbounded)
  )
  c.num_epochs = 1.0
  c.num_iterations = 0        # > 0 overrides num_epochs (rollout batches)
  c.optim = common.optim_config(lr=1e-6, schedule="constant", warmup_ratio=0.0,
                                weight_decay=0.01, grad_clip_norm=1.0)
  c.log_every = 1
  c.eval = dict(
      split="test",
      tasks=(),               # () -> data.tasks
      every=0,                # iterations between evaluations (0: at the end only)
      at_start=False,         # also evaluate the starting model (metrics `*_start`)
      batch_size=64,
      num_samples=1,          # answers per prompt (accuracy is their mean); the paper: 1
      max_examples=0,         # 0: the whole split
  )
  c.ckpt = dict(every=50, keep=3, async_save=True)  # in iterations
  c.mesh = sharding.mesh_config()
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, task="pathvqa", init="", rif="none", runlocal=False)
  c = rft_config()
  c.data.tasks = SEVEN_TASKS if arg.task == "all" else (arg.task,)
  c.data.synthetic = dict(train_size=2000, test_size=200, image_size=56, seed=0)
  c.data.prompt_style = "sft"
  c.data.max_len = 192
  c.data.length_buckets = (96, 128)  # SFT-style prompts of the tiny tokenizer: 60-130 tokens
  c.data.min_pixels, c.data.max_pixels = 56 * 56, 28 * 28 * 1280
  c.data.fixed_size = (56, 56)  # 4 image tokens per prompt, one compiled shape
  c.tokenizer.vocab_size = 512
  c.init.workdir = arg.init
  c.rif.mode = arg.rif
  c.rl.update(n=8, max_response_length=8, reward="no_cot", eval_temperature=0.0,
              rollout_batch_size=32, update_batch_size=16)
  # A tiny model needs a far larger step than the paper's 1e-6 on a 7B model.
  c.optim = common.optim_config(lr=1e-4, schedule="constant", warmup_ratio=0.0,
                                weight_decay=0.01, grad_clip_norm=1.0)
  c.num_epochs = 1.0
  c.eval.batch_size = 64
  c.ckpt.every = 20
  if arg.runlocal:
    c.data.synthetic = dict(train_size=64, test_size=32, image_size=56, seed=0)
    c.tokenizer.vocab_size = 320
    c.rl.update(n=4, rollout_batch_size=8, update_batch_size=4)
    c.num_iterations = 3
    c.eval.batch_size = 8
    c.ckpt.every = 2
  return c
