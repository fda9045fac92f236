"""Which files ``rdn-client upscale`` reads and where it writes each answer, as pure functions.

Inputs are files and folders (optionally walked into sub-folders); outputs are one named file,
or ``<stem>_<tag>.<ext>`` mirrored under an output folder, the format following ``--format`` or
the output file's extension. Kept apart from the command line so the naming rules read, and are
tested, on their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

IMAGE_SUFFIXES = (
    *(".png", ".apng", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"),
    *(".gif", ".heic", ".heif", ".avif"),
)
EXTENSIONS = {
    "png": ".png",
    "jpeg": ".jpg",
    "webp": ".webp",
    "raw": ".raw",
    "avif": ".avif",
    "gif": ".gif",
    "tiff": ".tiff",
}
FORMAT_OF_EXTENSION = {
    ".png": "png",
    ".apng": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".webp": "webp",
    ".avif": "avif",
    ".gif": "gif",
    ".tif": "tiff",
    ".tiff": "tiff",
}


def size_tag(width: int, height: int, scale: int, resized: bool) -> str:
    """What an output's name says of its size: ``1000x750`` when resized, else ``x2``."""
    return f"{width}x{height}" if resized else f"x{scale}"


def output_path(relative: Path, output: Path, to_file: bool, fmt: str, tag: str) -> Path:
    """Where the upscaled input goes: ``output`` itself, or ``<stem>_<tag>.<ext>`` at its
    ``relative`` place under ``output`` (``tag``: ``x2``, or ``1000x750`` when resized)."""
    if to_file:
        return output
    return output / relative.parent / f"{relative.stem}_{tag}{EXTENSIONS[fmt]}"


def expand_inputs(inputs: Sequence[Path], recursive: bool) -> list[tuple[Path, Path]]:
    """(file, its path relative to the output folder) for each input file and each image in
    an input folder (its sub-folders too with ``recursive``), sorted within a folder.

    Raises ``ValueError`` for a folder without images or a missing input, and when two
    outputs would collide."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        if item.is_dir():
            pattern = "**/*" if recursive else "*"
            images = sorted(
                p for p in item.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not images:
                deep = " (or its sub-folders)" if recursive else "; --recursive looks deeper"
                raise ValueError(f"{item}: no {'/'.join(IMAGE_SUFFIXES)} images in it{deep}")
            found += [(p, p.relative_to(item)) for p in images]
        elif item.exists():
            found.append((item, Path(item.name)))
        else:
            raise ValueError(f"{item}: no such file or folder")
    keys = [r.with_suffix("") for _, r in found]
    if len(set(keys)) != len(keys):
        raise ValueError(
            "two inputs share a name (apart from the extension); outputs would collide"
        )
    return found


def resolve_format(output: Path, to_file: bool, given: str | None) -> str | None:
    """The output format: ``--format`` when given, else the single output file's extension
    (.png, .jpg/.jpeg, .webp, .avif, .gif, .tif/.tiff), else PNG for one named file; None for
    a folder: each file keeps its own kind (``own_format``)."""
    if given is not None:
        return given
    if to_file:
        return FORMAT_OF_EXTENSION.get(output.suffix.lower(), "png")
    return None


def own_format(source: Path) -> str:
    """The format a file is written back in when no format is given: its own kind (PNG and
    APNG, JPEG, WebP, AVIF, GIF, TIFF: an animation stays animated, 16 bits stay 16), else
    PNG (BMP, HEIC)."""
    return FORMAT_OF_EXTENSION.get(source.suffix.lower(), "png")


def option_warnings(output: Path, to_file: bool, fmt: str | None, quality: int) -> list[str]:
    """One line for each option that has no effect or contradicts another."""
    warnings = []
    if quality and fmt in ("png", "tiff"):
        warnings.append(f"--quality {quality} has no effect on {fmt.upper()} output (lossless)")
    implied = FORMAT_OF_EXTENSION.get(output.suffix.lower()) if to_file else None
    if to_file and implied is not None and implied != fmt:
        warnings.append(f"writing {fmt} data to {output.name} (--format {fmt} overrides the name)")
    return warnings


def writes_single_file(inputs: Sequence[Path], output: Path) -> bool:
    """One input file and an output that is not a folder and names a file (has a suffix)."""
    single = len(inputs) == 1 and not inputs[0].is_dir()
    return single and not output.is_dir() and output.suffix != ""
