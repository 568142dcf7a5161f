"""The package's layout rules (docs/architecture.md): no import circle, the library never imports a driver, and
TensorFlow is loaded only where it is used."""
import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ddpm_jax"


def _module_name(path):
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
  """{module: set of ddpm_jax modules it imports}, counting imports inside functions too (they are circles as well,
  only hidden)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        edges |= {a.name for a in node.names if a.name in modules}
      elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ddpm_jax":
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          edges.add(full if full in modules else node.module)
    graph[name] = edges - {name}
  return graph


def _find_cycle(graph):
  """One import circle as a list of modules, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None
  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_cycle_finder_finds_a_circle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_circle():
  graph = import_graph()
  assert "ddpm_jax.modes.evaluate" in graph and "ddpm_jax.evaluation.bpd" in graph["ddpm_jax.modes.evaluate"]
  cycle = _find_cycle(graph)
  assert cycle is None, "import circle: " + " → ".join(cycle)


def test_the_library_does_not_import_the_drivers():
  graph = import_graph()
  drivers = {m for m in graph if m == "ddpm_jax.modes" or m.startswith("ddpm_jax.modes.")}
  assert {"ddpm_jax.modes.train", "ddpm_jax.modes.sweep"} <= drivers
  for module, imported in graph.items():
    if module not in drivers:
      assert not imported & drivers, f"{module} imports the run driver(s) {sorted(imported & drivers)}"


def test_sampling_and_editing_never_load_tensorflow(tmp_path):
  # Its import is seconds of every run's start-up; sample, sweep, edit and eval (without its figures) read and write
  # local files with Python's own I/O (fileio.py) and need none of it.
  code = ("import sys; import numpy as np; from ddpm_jax.modes import sample, sweep, edit, evaluate, distill; "
          "from ddpm_jax import fileio; fileio.save_npz(sys.argv[1], a=np.zeros(2)); fileio.load_npz(sys.argv[1]); "
          "print(sorted(m for m in ('tensorflow', 'clu', 'tensorflow_datasets') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "shard.npz")], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[]", out.stdout
