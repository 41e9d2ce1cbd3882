#!/usr/bin/env python3
"""Generate the Python stubs of every ``protos/**/*.proto`` (the one command for it).

    python scripts/gen_protos.py            # regenerate in place
    python scripts/gen_protos.py --check    # exit 1, listing stale files, if the checked-in stubs differ

Runs ``grpc_tools.protoc`` (pinned in the ``dev`` extra) from the repository root with ``-I .``,
so the generated modules import each other as ``from protos.rlhf.v1 import reward_pb2``.
For each ``X.proto`` it writes ``X_pb2.py``, ``X_pb2.pyi`` and ``X_pb2_grpc.py`` beside it.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """Every .proto under protos/, relative to the repository root, in a stable order."""
    return sorted(p.relative_to(ROOT) for p in (ROOT / PROTO_DIR).rglob("*.proto"))


def expected_outputs(protos: list[Path]) -> list[Path]:
    return [p.with_name(p.stem + s) for p in protos for s in SUFFIXES]


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto, writing the stubs under ``out_dir``; return their relative paths."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    import grpc_tools

    protos = proto_files()
    if not protos:
        raise SystemExit(f"no .proto files under {ROOT / PROTO_DIR}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        "-I.",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(p.as_posix() for p in protos),
    ]
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return expected_outputs(protos)


def stale_files() -> list[str]:
    """Checked-in stubs that differ from a fresh generation, are missing, or have no .proto left."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [
            p.as_posix() for p in fresh
            if not (ROOT / p).is_file() or not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False)
        ]
    wanted = {p.as_posix() for p in fresh}
    for suffix in SUFFIXES:
        for p in (ROOT / PROTO_DIR).rglob("*" + suffix):
            rel = p.relative_to(ROOT).as_posix()
            if rel not in wanted:
                stale.append(f"{rel} (its .proto is gone)")
    return sorted(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the checked-in stubs are fresh")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated stubs (run: python scripts/gen_protos.py):", file=sys.stderr)
            for s in stale:
                print(f"  {s}", file=sys.stderr)
            return 1
        print(f"{len(proto_files())} proto file(s): generated stubs are fresh")
        return 0
    written = generate(ROOT)
    for p in written:
        print(f"wrote {p.as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
