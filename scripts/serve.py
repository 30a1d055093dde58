"""Serve a model folder over HTTP; the same as `unified-vl serve` (see its --help).

    python scripts/serve.py --model runs/main/model --port 8000 --max-batch 16 --max-wait-ms 10

Expect a log line "serving <name> (...) on http://127.0.0.1:8000", then uvicorn's access log;
stop with Ctrl-C. `curl localhost:8000/health` answers {"status": "ok", ...}.
"""

import sys

from unified_vl.app.inference.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
