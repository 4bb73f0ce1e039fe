"""``python -m space.zoo list|train``: show or reproduce the default anchor zoo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from space.zoo import ZOO_DIR, manifest
from space.zoo.recipes import SPECS


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def cmd_list() -> int:
    """Prints the zoo as a table."""
    try:
        anchors = manifest()["anchors"]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [("name", "family", "blocks", "MACs", "params", "test acc")]
    from space.zoo import load_zoo_anchor

    for name in sorted(anchors):
        e = anchors[name]
        blocks = load_zoo_anchor(name).num_blocks
        rows.append(
            (
                f"zoo:{name}",
                e["family"],
                str(blocks),
                _fmt(e["macs"]),
                _fmt(e["params"]),
                f"{e['test_acc']:.2f}%",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m space.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the zoo: name, family, blocks, MACs, params, test accuracy")
    tr = sub.add_parser(
        "train", help="train zoo anchors from scratch (seeded) and write the manifest"
    )
    tr.add_argument(
        "--anchors",
        nargs="+",
        default=sorted(SPECS),
        metavar="NAME",
        help=f"which anchors (default: all of {', '.join(sorted(SPECS))})",
    )
    tr.add_argument(
        "--out",
        type=Path,
        default=ZOO_DIR,
        help="output folder for weights and manifest.json (default: the package's zoo)",
    )
    tr.add_argument("--data", default=None, help="Fashion-MNIST directory (default: auto-detect)")
    tr.add_argument("--epochs", type=int, default=None, help="override every anchor's epochs")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        return cmd_list()
    bad = [a for a in args.anchors if a not in SPECS]
    if bad:
        parser.exit(2, f"error: --anchors: unknown {bad}; choose from {sorted(SPECS)}\n")
    if args.epochs is not None and args.epochs < 1:
        parser.exit(2, f"error: --epochs must be >= 1, got {args.epochs}\n")
    from space.zoo.train import run_training

    try:
        run_training(args.anchors, args.out, data_root=args.data, epochs=args.epochs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
