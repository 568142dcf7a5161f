"""Where the train step's time goes: ddpm-jax's step under jax.profiler against diffusers' under torch.profiler.

  python benchmarks/profile_train.py [--batch=8] [--steps=3] [--threads=N] [--forward] [--quick]

Ours: every XLA:CPU thunk of the compiled step (an HLO instruction; a fusion counts as what it fuses), classified
from the compiled HLO: convolutions split into forward, input gradient (under `transpose(...)` in the op name) and
weight gradient (a window as large as the image: the batch is the contracted dimension), matmuls, layout copies
(transpose/copy), reductions and the rest (elementwise). PyTorch: the self time of each aten op in the same
classes (oneDNN does a convolution's input and weight gradient in one `convolution_backward`). Both are summed
over --steps profiled steps after 3 warm-up steps and shown per step. XLA:CPU may run independent thunks side by side, so
our column can add up to more than the step's wall time; the shares are what to compare.
With --forward the profiled call is one forward pass at t = 500 (train=False, under torch.no_grad): what each step
of the sampling chain runs. The last line is the headline: the class where ours loses most time against PyTorch.
"""
import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import common  # pylint: disable=g-bad-import-order  # also puts the repo on sys.path

import jax
import torch

CLASSES = ("conv forward", "conv input grad", "conv weight grad", "conv backward (both)", "matmul",
           "layout (transpose/copy)", "reduction", "elementwise and other")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def _computations(hlo_text):
  """name → list of its instruction lines, from HLO text."""
  comps, current = {}, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m and not line.startswith(" "):
      current = comps.setdefault(m.group(1), [])
    elif current is not None and line.startswith(" "):
      current.append(line)
  return comps


def _opcode(line):
  m = _INSTRUCTION.match(line)
  return m.group(2) if m else ""


def _conv_class(conv_line, outer_line):
  """A convolution's class from its own HLO line and the line of the fusion around it (which has the op name)."""
  window = re.search(r"window=\{size=(\d+)x(\d+)", conv_line)
  if window and max(int(window.group(1)), int(window.group(2))) > 3:  # the image is the window: a weight gradient
    return "conv weight grad"
  return "conv input grad" if "transpose(" in conv_line + outer_line else "conv forward"


def classify_hlo(hlo_text):
  """HLO instruction name → one of CLASSES, for every instruction of a compiled module's text."""
  comps = _computations(hlo_text)
  classes = {}
  for lines in comps.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      name, opcode = m.group(1), m.group(2)
      body = [line]
      called = re.search(r"calls=%?([\w.\-]+)", line)
      if opcode == "fusion" and called:
        body = comps.get(called.group(1), []) + [line]
      ops = {_opcode(l) for l in body}
      if "convolution" in ops:
        conv_line = next(l for l in body if " convolution(" in l)
        classes[name] = _conv_class(conv_line, line)
      elif "dot" in ops:
        classes[name] = "matmul"
      elif "reduce" in ops or "reduce-window" in ops:
        classes[name] = "reduction"
      elif opcode in ("transpose", "copy") or (opcode == "fusion" and ops <= {"transpose", "copy", "bitcast",
                                                                             "parameter", "fusion"}):
        classes[name] = "layout (transpose/copy)"
      else:
        classes[name] = "elementwise and other"
  return classes


def profile_ours(step, num_steps):
  """({class: seconds} summed over num_steps profiled calls of step, their wall seconds); step has .compiled."""
  classes = classify_hlo(step.compiled.as_text())
  with tempfile.TemporaryDirectory() as log_dir:
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(num_steps):
      step()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    trace_path, = glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(trace_path) as f:
      trace = json.load(f)
  seconds = collections.Counter()
  unclassified = 0
  for event in trace["traceEvents"] if isinstance(trace, dict) else trace:
    if event.get("ph") == "X" and event.get("name") in classes:
      seconds[classes[event["name"]]] += event["dur"] * 1e-6
    elif event.get("ph") == "X" and re.fullmatch(r"[a-z][\w\-]*\.\d+", event.get("name", "")):
      unclassified += 1
  if unclassified:
    print(f"note: {unclassified} thunk events not found in the HLO text were left out")
  return seconds, wall


def _torch_class(op_name):
  if op_name in ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d",
                 "aten::_slow_conv2d_forward", "aten::thnn_conv2d"):
    return "conv forward"
  if "convolution_backward" in op_name:
    return "conv backward (both)"
  if any(k in op_name for k in ("addmm", "bmm", "baddbmm", "::mm", "matmul", "linear", "scaled_dot_product")):
    return "matmul"
  if any(k in op_name for k in ("copy_", "contiguous", "clone", "permute", "transpose", "to_dense")):
    return "layout (transpose/copy)"
  if any(k in op_name for k in ("sum", "mean", "norm", "var", "std", "softmax")):
    return "reduction"
  return "elementwise and other"


def profile_torch(step, num_steps):
  """({class: seconds} of the aten ops' self time over num_steps calls of step, their wall seconds)."""
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range(num_steps):
      step()
    wall = time.perf_counter() - t0
  seconds = collections.Counter()
  for event in prof.key_averages():
    if event.key.startswith("aten::"):
      seconds[_torch_class(event.key)] += event.self_cpu_time_total * 1e-6
  return seconds, wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3, help="profiled steps of each framework")
  parser.add_argument("--forward", action="store_true", help="profile one forward pass (a sampling step) instead")
  args = parser.parse_args()
  if args.quick:
    args.model, args.batch, args.steps = "tiny", 2, 1
  torch.set_num_threads(args.threads)
  config = common.train_config(args.model)
  ours, params, theirs, size = common.matched_models(args.model, dropout=config.model.dropout)
  for line in common.machine_info(args.threads):
    print(line)
  what = "forward passes" if args.forward else "train steps"
  print(f"model: {args.model}, batch {args.batch}, {args.steps} profiled {what} each after 3 warm-up calls\n")
  batch_np = common.random_batch(args.model, args.batch)
  if args.forward:
    step_ours = common.ours_forward(ours, params, batch_np, compiler_options=common.main_py_options(args.model))
    step_pt = common.torch_forward(theirs, batch_np)
  else:
    step_ours, _, _, _ = common.ours_train_step(ours, params, config, batch_np, common.main_py_options(args.model))
    step_pt, _ = common.torch_train_step(theirs, config, batch_np)
  for _ in range(3):  # oneDNN builds its primitives over the first steps
    step_ours()
    step_pt()
  mine, wall_ours = profile_ours(step_ours, args.steps)
  theirs_s, wall_pt = profile_torch(step_pt, args.steps)
  total_ours, total_pt = sum(mine.values()), sum(theirs_s.values())
  rows = []
  for c in CLASSES:
    a, b = mine.get(c, 0.0) / args.steps, theirs_s.get(c, 0.0) / args.steps
    if a or b:
      rows.append([c, f"{a:.3f}", f"{a / total_ours * args.steps:.0%}", f"{b:.3f}",
                   f"{b / total_pt * args.steps:.0%}", f"{a - b:+.3f}"])
  rows.append(["total", f"{total_ours / args.steps:.3f}", "", f"{total_pt / args.steps:.3f}", "",
               f"{(total_ours - total_pt) / args.steps:+.3f}"])
  rows.append(["wall time of the profiled steps", f"{wall_ours / args.steps:.3f}", "",
               f"{wall_pt / args.steps:.3f}", "", f"{(wall_ours - wall_pt) / args.steps:+.3f}"])
  common.print_table(["class", "ddpm-jax s/step", "share", "PyTorch s/step", "share", "ours − PyTorch"], rows)
  # Compare convolutions' backward as one class: PyTorch does not split it.
  gaps = {c: mine.get(c, 0.0) - theirs_s.get(c, 0.0) for c in CLASSES if not c.startswith("conv")}
  gaps["convolutions, all"] = (sum(v for k, v in mine.items() if k.startswith("conv"))
                               - sum(v for k, v in theirs_s.items() if k.startswith("conv")))
  worst = max(gaps, key=gaps.get)
  print(f"\nlargest gap: {worst}, {gaps[worst] / args.steps:+.3f} s/step of ours − PyTorch's "
        f"{(total_ours - total_pt) / args.steps:+.3f} s/step in all")


if __name__ == "__main__":
  main()
