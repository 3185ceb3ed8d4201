"""Print a profile's server args as `sglang.launch_server` flags (or JSON), e.g. for a worker:

python -m sglang.launch_server --model-path M $(python -m kernels_cfg h100-80gb --model-size-b 8)
"""

from __future__ import annotations

import argparse
import sys

import orjson

from kernels_cfg import ProfileError, estimate_model_size_b, list_profiles, load_profile, to_cli_flags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kernels_cfg",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "profile", nargs="?", help=f"profile or GPU name (default: detect); one of {list_profiles()}"
    )
    p.add_argument("--model-size-b", type=float, help="parameters in billions (picks the size class)")
    p.add_argument("--model", help="local checkpoint to read the size from instead of --model-size-b")
    p.add_argument("--fp8", action="store_true", help="add the profile's [fp8] settings (Hopper only)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of flags")
    a = p.parse_args(argv)
    size = a.model_size_b
    if size is None and a.model:
        size = estimate_model_size_b(a.model)
    try:
        args = load_profile(a.profile, model_size_b=size, fp8=a.fp8)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(orjson.dumps(args).decode() if a.json else " ".join(str(x) for x in to_cli_flags(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
