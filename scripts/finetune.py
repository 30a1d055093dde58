"""Fine-tune one task (full, frozen parts, few-shot); the same as `unified-vl finetune` (see its --help).

    python scripts/finetune.py --task vqa --data DATA --init runs/pretrain-.../model
    python scripts/finetune.py --task rec --data DATA --init MODEL --shots 32 --seed 1 scripts/configs/finetune_fewshot.yaml

Expect a progress bar, a validation line every `eval.every` steps, then the task's test metrics
and the exported model folder `<output_dir>/model`.
"""

import sys

from unified_vl.app.jobs.finetune import main

if __name__ == "__main__":
    sys.exit(main())
