"""The application layer's jobs: pretrain, finetune, evaluate (each ``main(argv) -> int``)."""

import os

# OpenMP threads that spin-wait for each other collapse when another process shares the cores:
# on a 2-core machine with one busy neighbour, uvl-tiny trained at 10 samples/s with the default
# (active) policy and at 142 with the passive one (1 thread: 153). Read when torch loads OpenMP,
# so it must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
