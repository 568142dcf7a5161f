"""The digits model to distill: configs/digits_long.py trained twice as long, and distilled in 4,000-step rounds.

Run:  python main.py --config=configs/digits_distill.py --workdir=runs/digits_distill
then: python main.py --config=configs/digits_distill.py --workdir=runs/digits_distill --mode=distill
      python main.py --config=configs/digits_distill.py --workdir=runs/digits_distill --mode=sample \
        --config.sampling.checkpoint=distill/4
On 2 cores of an Intel Xeon VM (AVX-512): about an hour of training, and about 19 minutes for each of the four
rounds (64 → 32, 16, 8, 4 steps) alone. A progressive-distillation student can at best reach the model's
deterministic path (the probability-flow ODE). At 8,000 steps that path (64 DDIM steps) scores over 2 FID worse than
the 1000-step chain; at 16,000 it is within 0.3 of it. docs/distillation.md has the figures.
"""
from configs import digits_long


def get_config():
  config = digits_long.get_config()
  config.training.num_train_steps = 16000
  # Four times the demo's rounds: each round loses ~5× less to its teacher (measured on the 8,000-step model).
  config.distill.steps_per_round = 4000
  config.distill.ema_decay = 0.99875  # 0.995^(1000/4000): the demo's share of the teacher left after a round.
  config.distill.end_steps = 4
  return config
