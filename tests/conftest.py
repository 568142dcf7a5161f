"""Test set-up: 8 virtual CPU devices (set before jax is imported) and strict rank promotion."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top

# Catches [B] vs [B, H, W, C] broadcasting slips that would otherwise pass silently.
jax.config.update("jax_numpy_rank_promotion", "raise")
