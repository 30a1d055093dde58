"""Multi-task pretraining on DeepSpeed; the same as `unified-vl pretrain` (see its --help).

    python scripts/pretrain.py                                   # the built-in main job (15 min of training, ~16 in all on 2 CPU cores)
    python scripts/pretrain.py scripts/configs/pretrain_tiny.yaml train.max_minutes=5
    torchrun --nproc_per_node 2 scripts/pretrain.py scripts/configs/pretrain_tiny.yaml train.num_threads=1
    deepspeed --hostfile hostfile scripts/pretrain.py scripts/configs/pretrain_medium_zero2.yaml

Expect a progress bar (loss, lr, samples/s, ETA), then the metrics of every task on test and
heldout next to the trivial baselines, the exported model folder and a `unified-vl predict` command.
"""

import sys

from unified_vl.app.jobs.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
