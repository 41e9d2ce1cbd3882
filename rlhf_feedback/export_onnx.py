"""``rlhf-feedback export-onnx``: its parser and its runner (the export itself is
:mod:`services.runtime.onnx_export`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.runtime.onnx_export import (
    CHECK_TOLERANCE,
    DEFAULT_OPSET,
    INT8_WARNING,
    QUANTIZATIONS,
    ExportError,
    check_export,
    check_out_dir,
    export_onnx,
    load_source,
)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "export-onnx",
        help="Export a reward model to ONNX for `serve reward --backend onnx`.",
        description="Export a Hugging Face sequence-classification reward model (or the embedded default) "
        "to an ONNX folder with dynamic batch and sequence axes, its tokenizer, chat template, config and "
        "a manifest. Serve it with `rlhf-feedback serve reward --backend onnx --model OUT`.",
    )
    p.add_argument(
        "--model",
        default="default",
        metavar="DIR",
        help="The checkpoint folder to export, or `default` for the embedded reward model (default: default).",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="The export folder to write (replaced if it is an earlier export).",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET}).")
    p.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=None,
        help="Dynamic int8 weights (faster on CPU, less exact: check with `bench agreement`).",
    )
    p.add_argument(
        "--check",
        type=int,
        default=0,
        metavar="N",
        help=f"After exporting, score N synthetic items with ONNX and torch float32 and print max |Δ|; "
        f"exit 1 when a float32 export differs by more than {CHECK_TOLERANCE:g} (default 0: no check).",
    )
    p.add_argument("--threads", type=int, default=None, help="Threads for the check (torch and onnxruntime).")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"rlhf-feedback export-onnx: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.check < 0:
        return _fail("--check must be 0 or more")
    if args.opset < 14:
        return _fail("--opset must be 14 or more (scaled-dot-product attention)")
    if args.model == "default":
        from services.runtime.default_model import default_model_dir

        try:
            model_dir = default_model_dir()
        except FileNotFoundError as exc:
            return _fail(str(exc))
    else:
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            return _fail(f"--model {model_dir} is not a Hugging Face checkpoint folder (no config.json)")
    out: Path = args.out
    try:
        check_out_dir(out)
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        print(f"loading {model_dir}", file=sys.stderr)
        source = load_source(model_dir)
        if args.quantize:
            print(INT8_WARNING, file=sys.stderr)
        print(f"exporting to {out} (opset {args.opset}{', int8' if args.quantize else ''})", file=sys.stderr)
        manifest = export_onnx(model_dir, out, opset=args.opset, quantize=args.quantize, source=source)
    except ExportError as exc:
        return _fail(str(exc))
    print(f"wrote {out / manifest.model_file} ({manifest.kind}, {manifest.dtype}, inputs {', '.join(manifest.inputs)})")
    if args.check:
        result = check_export(out, source, args.check, threads=args.threads)
        print(
            f"check: {result.items} items, max |Δ| {result.max_abs_diff:.3g}, mean |Δ| {result.mean_abs_diff:.3g} "
            "(ONNX batched vs torch float32 one item at a time)"
        )
        if manifest.quantized is None and result.max_abs_diff > CHECK_TOLERANCE:
            print(f"check FAILED: max |Δ| over {CHECK_TOLERANCE:g}", file=sys.stderr)
            return 1
    return 0
