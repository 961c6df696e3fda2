"""Seq-CIFAR-100 (10 tasks x 10 classes), reduced ResNet-18, ER or ParetoCL.

Needs the TFDS `cifar100` dataset already prepared under data_dir (nothing is downloaded):
`tfds build cifar100 --data_dir=DIR --file_format=array_record` where the internet is
reachable, then copy DIR/cifar100 to data_dir.

  python -m cpt_jax.main --config=configs/paretocl/seq_cifar100.py:method=paretocl,setting=offline,data_dir=DIR --workdir=/tmp/paretocl_cifar100

Options: method=er|paretocl, setting=online|offline, seed, buffer, augment, data_dir.
"""
from cpt_jax.paretocl import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="paretocl", setting="online", seed=0, buffer=1000,
                             augment="", data_dir="")
  config = config_lib.base_config(method=arg.method, setting=arg.setting, seed=arg.seed,
                                  buffer_size=arg.buffer, data_dir=arg.data_dir or None)
  config.data.name = "cifar100"
  config.data.num_tasks = 10
  config.data.classes_per_task = 10
  config.data.mean = (0.5071, 0.4865, 0.4409)
  config.data.std = (0.2673, 0.2564, 0.2762)
  config.train.augment = config_lib.parse_bool(arg.augment, default=arg.setting == "offline")
  return config
