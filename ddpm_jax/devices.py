"""The one check that a global batch (or sample count) splits evenly over devices or hosts, with its one-line error.

A module of its own, importing nothing, so every module that shards work (sampling, data, bits/dim, the FID
monitor, the config checks) can use it without importing any of the others.
"""


def check_divisible(field, value, num, what="devices"):
  """Raises the one-line error for a `field` of `value` that `num` devices (or hosts) cannot share evenly."""
  if value % num:
    raise ValueError(f"{field} = {value}: not divisible by the {num} {what}; use a multiple of {num} such as "
                     f"{max(num, value - value % num)}.")
