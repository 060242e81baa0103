"""Sequential read bandwidth of a checkpoint's files (run after dropping the page cache).

    python bench/diskread.py CKPT_DIR     # prints ``RESULT <json>``
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    files = sorted(Path(sys.argv[1]).glob("*.safetensors"))
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    secs = time.perf_counter() - t
    print("RESULT " + json.dumps([{"bytes": total, "seconds": round(secs, 2), "GBps": round(total / secs / 1e9, 2)}]))


if __name__ == "__main__":
    main()
