"""Keep N CPU cores busy (default 2) until killed: ``make test-under-load`` runs the suite beside it.

Each burner is a separate process spinning in pure Python, the way another tenant's job or a
parallel CI run would take the machine's cores; the suite must pass with it as on an idle machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import time


def _spin() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--procs", type=int, default=2, help="busy loops to run (default 2)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (default: until killed)")
    args = parser.parse_args()
    procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.procs)]
    for p in procs:
        p.start()
    print(f"cpu_burner: {args.procs} busy loops (pid {os.getpid()})", flush=True)
    try:
        if args.seconds > 0:
            time.sleep(args.seconds)
        else:
            signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        for p in procs:
            p.terminate()


if __name__ == "__main__":
    main()
