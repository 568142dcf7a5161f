"""User-typed paths made absolute once, where they enter: relative to the directory the command was started in.

Orbax refuses relative checkpoint paths (and its refusal surfaces minutes later, in a background thread), and a
relative path means something else once anything changes the working directory. Cloud paths (gs://…, anything
with a scheme) and '' (unset) are left as they are. This module imports no TensorFlow, so main.py can use it before
the heavy imports.
"""
import os

# Config fields that hold a path a user may type relative to the current directory.
CONFIG_PATH_FIELDS = ("restore_from", "data.path", "data.data_dir", "eval.ref_stats", "eval.inception_weights",
                      "edit.inputs")
# Fields holding a name or a path: made absolute only if a file or folder of that name exists.
CONFIG_NAME_OR_PATH_FIELDS = ("edit.masks",)


def absolute(path):
  """path as an absolute local path (~ expanded); URLs such as gs://bucket/x and '' unchanged."""
  path = os.fspath(path)
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def absolute_config_paths(config):
  """Makes every CONFIG_PATH_FIELDS field of config (an ml_collections.ConfigDict) absolute, in place.

  A field an older config does not have is skipped.
  """
  for field in CONFIG_PATH_FIELDS + CONFIG_NAME_OR_PATH_FIELDS:
    *parents, name = field.split(".")
    node = config
    for parent in parents:
      node = node.get(parent) if node is not None else None
    if node is not None and isinstance(node.get(name), str):
      if field in CONFIG_PATH_FIELDS or os.path.exists(os.path.expanduser(node[name])):
        node[name] = absolute(node[name])
  return config
