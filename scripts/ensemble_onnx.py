#!/usr/bin/env python3
"""Merge real/fake ONNX detectors into one: the mean of their P(generated), fp16 weights.

    python scripts/ensemble_onnx.py resnet32.onnx origin-class.onnx -o detector.onnx

`make detector` builds the built-in model with it. Prints the path written; errors are one
line on stderr with the exit code the CLI gives them (2: bad input, 1: a failure).
"""

from __future__ import annotations

import argparse
import sys

from fakecifar.ensemble import ensemble_onnx
from fakecifar.errors import FakecifarError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("members", nargs="+", help="fakecifar .onnx models with real/fake classes")
    parser.add_argument("-o", "--output", required=True, help="the ensemble .onnx to write")
    parser.add_argument("--fp32", action="store_true", help="keep float32 weights (twice the bytes)")
    args = parser.parse_args(argv)
    try:
        print(ensemble_onnx(args.members, args.output, fp16=not args.fp32))
    except FakecifarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
