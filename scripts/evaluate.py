"""Evaluate a model folder on stored data; the same as `unified-vl eval` (see its --help).

    python scripts/evaluate.py --model runs/pretrain-.../model --data DATA --split test heldout

Expect one line per metric key `{task}/{split}/{metric}` and the JSON file they were written to.
"""

import sys

from unified_vl.app.jobs.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
