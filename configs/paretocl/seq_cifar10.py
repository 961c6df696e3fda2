"""Seq-CIFAR-10 (5 tasks x 2 classes), reduced ResNet-18, ER or ParetoCL, online or offline.

Needs the TFDS `cifar10` dataset already prepared under data_dir (nothing is downloaded):
on a machine with internet, `tfds build cifar10 --data_dir=DIR --file_format=array_record`,
then copy DIR/cifar10 to data_dir.

  python -m cpt_jax.main --config=configs/paretocl/seq_cifar10.py:method=paretocl,setting=online,data_dir=DIR --workdir=/tmp/paretocl_cifar10

Options: method=er|paretocl, setting=online|offline (1 or 5 epochs), seed, buffer,
augment (default: on for offline), data_dir.
"""
from cpt_jax.paretocl import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="paretocl", setting="online", seed=0, buffer=1000,
                             augment="", data_dir="")
  config = config_lib.base_config(method=arg.method, setting=arg.setting, seed=arg.seed,
                                  buffer_size=arg.buffer, data_dir=arg.data_dir or None)
  config.data.name = "cifar10"
  config.data.num_tasks = 5
  config.data.classes_per_task = 2
  config.data.mean = (0.4914, 0.4822, 0.4465)
  config.data.std = (0.2470, 0.2435, 0.2615)
  config.train.augment = config_lib.parse_bool(arg.augment, default=arg.setting == "offline")
  return config
