"""The digits demo trained 2.7× longer: a model whose probability-flow ODE is worth testing fast solvers on.

Run:  python main.py --config=configs/digits_long.py --workdir=runs/digits_long
About an hour on 2 cores of a shared AMD EPYC VM (2.7–3.3 steps/s, so ~45 minutes of training, plus ~12 minutes
for the Inception statistics of the 1,797 digits before the first FID, and ~2 minutes per FID after that); 27
minutes in all on 2 cores of an Intel Xeon VM (AVX-512).
The demo (configs/digits.py, 3,000 steps) is good with the stochastic chain but its ODE is not: DDIM at 20 steps
scores several times the chain's FID, which caps every deterministic solver and the distilled students built on
them. Same data, U-Net and diffusion as the demo; only the length of training and what suits it change.
docs/evaluation.md measures the fast samplers on both models.
"""
from configs import digits


def get_config():
  config = digits.get_config()
  config.training.num_train_steps = 8000  # ~285 epochs of the 1,797 digits at batch 64.
  # 285 epochs of a small dataset can be memorised; dropout as in the paper's CIFAR-10 model. docs/evaluation.md
  # checks the samples' distance to their nearest training digit against the digits' own.
  config.model.dropout = 0.1
  # A horizon of ~2,000 steps. 0.9999 would still weight the random init by 0.9999^8000 = 45% at the end.
  config.optim.ema_decay = 0.9995
  config.training.checkpoint_every_steps = 2000
  config.training.keep_checkpoints = 4  # Every checkpoint from 2,000 on: the ODE's FID can be traced afterwards.
  config.training.sample_every_steps = 8000
  # The ODE's quality as training goes on: FID of 256 EMA samples by 20 deterministic DDIM steps, every 4,000 steps
  # (~40 s each here), the best kept in best_fid/.
  config.training.fid_every_steps = 4000
  config.training.fid_num_samples = 256
  config.training.fid_num_steps = 20
  config.training.fid_method = "ddim"
  return config
