"""The offline demo, class-conditional: the digits config with a label embedding and classifier-free guidance.

Run:  python main.py --config=configs/digits_cond.py --workdir=runs/digits_cond
The samples grid has one column per digit 0-9. Sample one digit with --mode=sample --config.sampling.labels='(3,)';
the guidance scale w (sampling.guidance_scale) trades diversity for fidelity to the label (docs/conditioning.md).
"""
from configs import digits


def get_config():
  config = digits.get_config()
  config.model.num_classes = 10  # The ten digits; the label embedding adds 11 × 128 parameters.
  config.model.class_dropout = 0.1  # One label in ten trained as "null", for classifier-free guidance.
  config.sampling.guidance_scale = 1.0  # eps = 2 eps(x, c) - eps(x, null).
  config.sampling.labels = ()  # Every digit in turn: sample i is digit i mod 10.
  config.training.num_grid_samples = 100  # Ten of each digit, one column per class.
  return config
