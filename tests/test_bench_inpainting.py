"""benchmarks/bench_inpainting.py --tiny end to end: a 2-step model trained in the script, our inpainting and
diffusers' RePaintPipeline on the same weights, digits and masks, judged by the demo's classifier."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, one_device_env

pytest.importorskip("torch", reason="the benchmark compares against PyTorch (the test extra)")
pytest.importorskip("diffusers", reason="the benchmark compares against diffusers (the test extra)")


def test_bench_inpainting_tiny(tmp_path):
  out = tmp_path / "inpaint"
  proc = subprocess.run([sys.executable, os.path.join("benchmarks", "bench_inpainting.py"), "--tiny", f"--out={out}"],
                        cwd=REPO, env=one_device_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  first_table, second_table = proc.stdout.strip().split("\n\n")
  lines = first_table.splitlines()
  assert re.match(r"Inpainting 8 held-out digits \('half' mask\), checkpoint step 2 of .*RePaint over 4 steps, "
                  r"jumps 2 × length 2; the classifier's held-out accuracy \d+\.\d%\.", lines[0]), lines[0]
  rows = {c[0]: c[1:] for c in ([x.strip() for x in l.split("|")[1:-1]] for l in lines if l.startswith("| ")
                                if not l.startswith(("| |", "|---")))}
  assert list(rows) == ["originals", "masked inputs", "ddpm-jax inpaint", "diffusers RePaintPipeline (η = 1)"], rows
  for name, (share, rms, seconds) in rows.items():
    assert 0 <= float(share.rstrip("%")) <= 100, (name, share)
    assert 0 <= float(rms) <= 255, (name, rms)
    assert (seconds == "") == (name in ("originals", "masked inputs")), (name, seconds)
  assert float(rows["originals"][1]) == 0  # nothing generated: no error
  # The lower halves of the digits are not all background: blanking them is an error, and so is a 2-step model's.
  assert float(rows["masked inputs"][1]) > 10 and float(rows["ddpm-jax inpaint"][1]) > 10, rows
  assert float(rows["ddpm-jax inpaint"][2]) > 0 and float(rows["diffusers RePaintPipeline (η = 1)"][2]) > 0

  with open(f"{out}.json", encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["step"] == 2 and saved["num"] == 8 and 0.5 < saved["classifier_accuracy"] <= 1
  share, rms, _ = saved["rows"]["ddpm-jax inpaint"]  # the printed cells, rounded
  assert f"{share:.1%}" == rows["ddpm-jax inpaint"][0] and f"{rms:.1f}" == rows["ddpm-jax inpaint"][1]
  assert os.path.getsize(f"{out}.png") > 500  # the sheet: originals, masked inputs, ours, theirs

  # What the known pixels alone say: classifiers trained on masked digits read the masked inputs at least as well as
  # the classifier of whole digits does (it takes the blank lower halves for ink that is missing).
  known = {c[0]: c[1:] for c in ([x.strip() for x in l.split("|")[1:-1]] for l in second_table.splitlines()
                                 if l.startswith("| ") and not l.startswith("| classifier"))}
  assert list(known) == ["logistic regression", "5 nearest neighbours"], known
  for accuracy, mean_p in known.values():
    assert 0 <= float(mean_p.rstrip("%")) <= 100
    assert float(accuracy.rstrip("%")) >= float(rows["masked inputs"][0].rstrip("%"))
  assert saved["known_pixels_alone"]["logistic regression"][0] == pytest.approx(
      float(known["logistic regression"][0].rstrip("%")) / 100, abs=5e-4)


def test_bench_inpainting_refuses_to_read_a_v_model_with_diffusers(tmp_path, capsys):
  """diffusers' RePaintScheduler reads every output as ε: on a v-model it must say so, not inpaint noise."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import bench_inpainting  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit):
    bench_inpainting.main([f"--config={os.path.join(REPO, 'configs', 'digits_distill.py')}", f"--workdir={tmp_path}"])
  message = capsys.readouterr().err.strip().splitlines()[-1]
  assert "RePaintScheduler reads only ε-models" in message and "'v'" in message and "--no_diffusers" in message
  # The same refusal when an override makes the ε-config's model a v-model: the override reaches the config.
  with pytest.raises(SystemExit):
    bench_inpainting.main([f"--config={os.path.join(REPO, 'configs', 'digits.py')}",
                           "--config.diffusion.model_mean_type=v", f"--workdir={tmp_path}"])
  message = capsys.readouterr().err.strip().splitlines()[-1]
  assert "RePaintScheduler reads only ε-models" in message and "'v'" in message
