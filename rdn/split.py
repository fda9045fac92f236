"""rdn-split: a reproducible train/validation split of an image folder, as symlinks.

The shipped models train on ../shared/data/SunHays80 with every 16th image (by sorted file
name, the first one included) held out for validation, so best.pt is chosen on photographs
the optimizer never saw and Set5/Set14 stay pure test sets:

    python -m rdn.split ../shared/data/SunHays80 runs/data --every 16

writes ``runs/data/train/`` and ``runs/data/val/`` holding symlinks to the originals.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rdn.imaging import list_images

log = logging.getLogger(__name__)


def split_names(names: Sequence[str], every: int) -> tuple[list[str], list[str]]:
    """(train, val): every ``every``-th name of the sorted names, from the first, is val."""
    if every < 2:
        raise ValueError(f"every must be >= 2 (got {every}): otherwise nothing is left to train on")
    ordered = sorted(names)
    val = ordered[::every]
    train = [n for i, n in enumerate(ordered) if i % every]
    return train, val


def _link_all(source: Path, names: Sequence[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = folder / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((source / name).resolve())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rdn-split", description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="folder of HR images")
    p.add_argument("out", type=Path, help="writes OUT/train and OUT/val (symlinks)")
    p.add_argument("--every", type=int, default=16, help="hold out every N-th image (default 16)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.source.is_dir():
        print(f"rdn-split: error: {args.source} is not a folder", file=sys.stderr)
        return 1
    names = [path.name for path in list_images(args.source)]
    try:
        train, val = split_names(names, args.every)
    except ValueError as e:
        print(f"rdn-split: error: {e}", file=sys.stderr)
        return 2
    if not train:
        print(f"rdn-split: error: {args.source} holds {len(names)} image(s)", file=sys.stderr)
        return 1
    for sub in ("train", "val"):
        old = args.out / sub
        if old.is_dir():
            for link in old.iterdir():
                if link.is_symlink():
                    link.unlink()
    _link_all(args.source, train, args.out / "train")
    _link_all(args.source, val, args.out / "val")
    log.info("%d train, %d val images under %s", len(train), len(val), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
