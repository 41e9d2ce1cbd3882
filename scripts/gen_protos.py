#!/usr/bin/env python3
"""Generate the Python stubs of every ``protos/**/*.proto`` (the one command for it).

    python scripts/gen_protos.py            # regenerate in place
    python scripts/gen_protos.py --check    # exit 1, listing stale files, if the checked-in stubs differ

Runs ``grpc_tools.protoc`` (grpcio-tools, pinned in the ``dev`` extra) from the repository root
with ``-I .``, so the generated modules import each other as ``from protos.rlhf.v1 import
reward_pb2``. For each ``X.proto`` it writes ``X_pb2.py``, ``X_pb2.pyi`` and ``X_pb2_grpc.py``
beside it. ``--check`` generates into a temporary folder and compares byte for byte; stubs whose
``.proto`` is gone count as stale too.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
PINNED_TOOLS = "1.85.1"  # keep in step with pyproject's dev extra


def proto_files(root: Path) -> list[Path]:
    """Every .proto under ``root/protos``, relative to ``root``, in a stable order."""
    return sorted(p.relative_to(root) for p in (root / PROTO_DIR).rglob("*.proto"))


def outputs_of(protos: list[Path]) -> list[Path]:
    return [p.with_name(p.stem + s) for p in protos for s in SUFFIXES]


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def generate(root: Path, out_dir: Path) -> list[Path]:
    """Run protoc on every proto under ``root``, writing under ``out_dir``; return the relative outputs."""
    import grpc_tools
    from grpc_tools import protoc

    protos = proto_files(root)
    if not protos:
        raise SystemExit(f"no .proto files under {root / PROTO_DIR}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        "-I.",
        f"-I{well_known}",
        f"--python_out={out_dir.resolve()}",
        f"--pyi_out={out_dir.resolve()}",
        f"--grpc_python_out={out_dir.resolve()}",
        *(p.as_posix() for p in protos),
    ]
    with _cwd(root):
        rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return outputs_of(protos)


def stale_files(root: Path) -> list[str]:
    """Checked-in stubs that differ from a fresh generation, are missing, or whose .proto is gone."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(root, Path(tmp))
        stale = [
            p.as_posix()
            for p in fresh
            if not (root / p).is_file() or not filecmp.cmp(Path(tmp) / p, root / p, shallow=False)
        ]
    wanted = {p.as_posix() for p in fresh}
    for suffix in SUFFIXES:
        for p in (root / PROTO_DIR).rglob("*" + suffix):
            rel = p.relative_to(root).as_posix()
            if rel not in wanted:
                stale.append(f"{rel} (its .proto is gone)")
    return sorted(stale)


def _tools_version_note() -> str | None:
    try:
        version = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        return "grpcio-tools is not installed: pip install -e '.[dev]'"
    if version != PINNED_TOOLS:
        return f"grpcio-tools {version} is installed but the stubs are made with {PINNED_TOOLS}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the checked-in stubs are fresh")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    note = _tools_version_note()
    if note:
        print(f"warning: {note}", file=sys.stderr)
    if args.check:
        stale = stale_files(root)
        if stale:
            print("stale generated stubs; regenerate with: python scripts/gen_protos.py", file=sys.stderr)
            for s in stale:
                print(f"  {s}", file=sys.stderr)
            return 1
        print(f"{len(proto_files(root))} proto file(s): generated stubs are fresh")
        return 0
    for p in generate(root, root):
        print(f"wrote {p.as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
