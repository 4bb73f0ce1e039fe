"""``python -m space.zoo list``: show the default anchor zoo.

Training moved to ``python -m tools.train_zoo`` (same flags); ``python -m space.zoo train``
only says so and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from space import load_anchor
from space.errors import InputError
from space.zoo import PREFIX, TRAIN_COMMAND, manifest


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def cmd_list() -> int:
    """Prints the zoo as a table."""
    try:
        anchors = manifest()["anchors"]
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [("name", "family", "blocks", "MACs", "params", "test acc")]
    for name in sorted(anchors):
        e = anchors[name]
        blocks = load_anchor(f"{PREFIX}{name}").num_blocks
        rows.append(
            (
                f"{PREFIX}{name}",
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
    sub.add_parser("train", help=f"moved: run `{TRAIN_COMMAND}` (same flags)")
    args, extra = parser.parse_known_args(argv)
    if args.cmd == "train":  # any flags: they belong to the new command
        print(
            f"error: training the zoo moved to `{TRAIN_COMMAND}` (same flags); run that instead",
            file=sys.stderr,
        )
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return cmd_list()


if __name__ == "__main__":
    sys.exit(main())
