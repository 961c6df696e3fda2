"""Multi-process start-up: call `initialize()` once, before anything touches a device.

  * TPU pod slice: no arguments; JAX reads the workers and coordinator from the TPU metadata.
  * GPU / CPU hosts: pass the coordinator, process count and id, or set them in the
    environment as COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID (or the JAX_* spellings
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). Arguments win over env.
  * Anything else (one process, or NUM_PROCESSES=1) is a no-op.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax

_log = logging.getLogger(__name__)

# Environment variables read for each setting, first match wins.
ENV_VARS: dict[str, tuple[str, ...]] = {
    "coordinator_address": ("COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("PROCESS_ID", "JAX_PROCESS_ID"),
}

_initialized = False  # set once this process has decided how it runs


def _env(setting: str) -> tuple[str, str] | None:
  for var in ENV_VARS[setting]:
    if os.environ.get(var):
      return var, os.environ[var]
  return None


def _str_setting(setting: str, value: str | None) -> str | None:
  if value:
    return value
  found = _env(setting)
  return None if found is None else found[1]


def _int_setting(setting: str, value: int | None) -> int | None:
  if value is not None:
    return int(value)
  found = _env(setting)
  if found is None:
    return None
  var, text = found
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{var}={text!r} is not an integer.") from None


def _on_cloud_tpu_vm() -> bool:
  # JAX sets this flag at import when it finds TPU chips and libtpu; there is no public
  # equivalent that does not start the backend (which must happen after initialize).
  from jax._src import cloud_tpu_init
  return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
               initialization_timeout: int = 300) -> tuple[int, int]:
  """Connects this process to the others (see module doc); idempotent.

  Returns:
    (process_index, process_count).
  """
  global _initialized
  if not (_initialized or jax.distributed.is_initialized()):
    address = _str_setting("coordinator_address", coordinator_address)
    count = _int_setting("num_processes", num_processes)
    index = _int_setting("process_id", process_id)
    if address is None and count is None and index is None:
      if _on_cloud_tpu_vm():
        jax.distributed.initialize(initialization_timeout=initialization_timeout)
    elif count == 1:
      if index not in (None, 0):
        raise ValueError(f"process_id={index} with num_processes=1; it must be 0.")
    else:
      missing = [setting for setting, value in
                 (("coordinator_address", address), ("num_processes", count), ("process_id", index))
                 if value is None]
      if missing:
        raise ValueError(
            f"Multi-process run is missing {missing}: pass them to initialize() or set "
            + ", ".join("/".join(ENV_VARS[m]) for m in missing) + ".")
      if not 0 <= index < count:
        raise ValueError(f"Need 0 <= process_id < num_processes; got process_id={index}, "
                         f"num_processes={count}.")
      jax.distributed.initialize(address, count, index, local_device_ids=local_device_ids,
                                 initialization_timeout=initialization_timeout)
    _initialized = True
    _log.info("process %d of %d; %d local / %d global devices (%s)", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count(),
              jax.default_backend())
  return jax.process_index(), jax.process_count()
