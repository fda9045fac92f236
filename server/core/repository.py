"""The model repository: every served model by name, one default per scale, hot reload.

Models come from a folder (``--model-dir``, every ``*.onnx`` in it) and from explicit files
(``--model``, repeatable). A model's name is its ``rdn.name`` metadata (rdn-export writes
``rdn_x2``, ``rdn_x4_photo`` ...), else its file stem; two files with one name are an error
naming both. Each scale's default is the model named by ``--default``, else ``rdn_x{scale}``,
else the first of that scale by name. The *server default* answers requests that name no
model, scale or size: the first ``--model``, else the default of ``--scale``.

What is served is an immutable ``Snapshot``; a load, an unload or a re-scan (SIGHUP) builds the
new pipelines first (engine, warm-up) and then replaces the snapshot in one assignment on the
event loop. A call resolves its pipeline from the snapshot current when it starts and keeps
that object to its end, so calls in flight finish on the version they started with and new
calls go to the new one. A file that fails to load leaves the old version serving; the error
is logged, returned to the caller of ``load`` and shown in the index.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rdn.constants import CPU as CPU_PROVIDER
from rdn.constants import DEFAULT_SCALE
from rdn.metadata import (
    INT8_MAX_LOSS_DB,
    INT8_SUFFIX,
    KEY_NAME,
    KEY_SCALE,
    MetadataError,
    read_metadata,
    valid_model_name,
)
from server.core.errors import NotFound, RequestError, check_name
from server.core.pipeline import Pipeline
from server.core.sizing import SizeOptions, needed_factor, output_size, smallest_scale
from server.wire import AUTO_MODEL

log = logging.getLogger(__name__)

PHOTO_SUFFIX = "_photo"  # rdn_x2_photo: the photo model beside the clean rdn_x2
READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


class RepositoryError(RuntimeError):
    """The repository cannot be assembled (duplicate names, no model, a bad --default)."""


class LoadFailed(RuntimeError):
    """A model file could not be loaded; the old version (if any) keeps serving."""


@dataclass(frozen=True)
class RepositoryConfig:
    """Where models come from and which ones are defaults."""

    model_dir: Path | None = None  # every *.onnx in it
    models: tuple[Path, ...] = ()  # explicit files; the first is the server default
    defaults: tuple[str, ...] = ()  # names made the default of their scale
    default_scale: int = DEFAULT_SCALE  # the server default's scale when no explicit file is given
    # Which twin a scale's default is: "auto" the int8 one on a CPU when its measured loss is
    # within INT8_MAX_LOSS_DB, "int8" the int8 one whenever it is served, "fp32" never.
    precision: str = "auto"


def model_name_of(path: Path) -> str:
    """The name a file is served under: its ``rdn.name`` metadata, else its stem."""
    name = read_metadata(path).get(KEY_NAME, "")
    return name if name else path.stem


def discover(config: RepositoryConfig, known: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """Name -> file of every model the configuration names (explicit files first, then the
    folder's, sorted); ``RepositoryError`` when two files share a name or a name is invalid.

    An unreadable file raises ``MetadataError``, unless ``known`` (the names found before: a
    re-scan) is given: then it is logged and keeps the name it had, so loading it fails and says
    why while the old version serves on."""
    paths = list(config.models)
    if config.model_dir is not None:
        if not config.model_dir.is_dir():
            raise RepositoryError(f"--model-dir {config.model_dir}: no such folder")
        paths += sorted(p for p in config.model_dir.glob("*.onnx") if p.is_file())
    found: dict[str, Path] = {}
    before = {path: name for name, path in (known or {}).items()}
    for path in paths:
        try:
            name = model_name_of(path)
        except MetadataError as e:
            if known is None:
                raise
            log.error("model repository re-scan: %s", e)
            if path not in before:
                continue
            name = before[path]
        if not valid_model_name(name):
            raise RepositoryError(
                f"{path}: the name {name!r} is not a valid model name (letters, digits, _ . -); "
                "rename the file or re-export it with rdn-export --name"
            )
        other = found.get(name)
        if other is not None and other.resolve() != path.resolve():
            raise RepositoryError(
                f"two model files are both named {name!r}: {other} and {path}; rename one "
                "(rdn-export --name) or serve only one"
            )
        found[name] = path
    return found


def _still_named(path: Path, name: str) -> bool:
    """Whether the file at ``path`` is still model ``name``; a file that exists but cannot be
    read keeps its name (loading it then fails and says why, the old version serving on)."""
    if not path.is_file():
        return False
    try:
        return model_name_of(path) == name
    except MetadataError:
        return True


def file_scales(paths: Iterable[Path]) -> set[int]:
    """The scales the files' metadata declare (files without ``rdn.scale`` are left out)."""
    scales = set()
    for path in paths:
        declared = read_metadata(path).get(KEY_SCALE, "")
        if declared.isdigit():
            scales.add(int(declared))
    return scales


@dataclass(frozen=True)
class Snapshot:
    """The models served at one moment; never changed once built."""

    models: Mapping[str, Pipeline] = field(default_factory=dict)
    defaults: Mapping[int, str] = field(default_factory=dict)  # scale -> model name
    primary: str = ""  # the server default's name ("" when nothing is loaded)
    photos: Mapping[int, str] = field(default_factory=dict)  # scale -> its photo model's name

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(sorted(self.defaults))

    def ordered(self) -> list[Pipeline]:
        """Every model, the server default first, then by scale and name."""
        rest = sorted(
            (p for n, p in self.models.items() if n != self.primary),
            key=lambda p: (p.scale, p.name),
        )
        return ([self.models[self.primary]] if self.primary in self.models else []) + rest

    def get(self, name: str) -> Pipeline:
        """The model called ``name``; ``NotFound`` lists the names served."""
        check_name(name, "model")
        pipeline = self.models.get(name)
        if pipeline is None:
            served = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"unknown model {name!r}; models served: {served}")
        return pipeline

    def default(self) -> Pipeline:
        if self.primary not in self.models:
            raise NotFound("no model is loaded; load one (RepositoryModelLoad) or restart")
        return self.models[self.primary]

    def for_scale(self, scale: int) -> Pipeline:
        name = self.defaults.get(scale)
        if name is None:
            served = ", ".join(f"x{s}" for s in self.scales) or "none"
            raise NotFound(f"no model of scale x{scale} is served; scales served: {served}")
        return self.models[name]

    def photo_for(self, options: SizeOptions, pipeline: Pipeline) -> Pipeline | None:
        """The photo model that ``model=auto`` may choose instead of ``pipeline``: when the
        request names no model and ``pipeline`` is its scale's default, that scale's photo
        model (``{default}_photo``, or its int8 twin where the default would be int8)."""
        if named(options) or self.defaults.get(pipeline.scale) != pipeline.name:
            return None
        name = self.photos.get(pipeline.scale)
        return self.models[name] if name is not None else None

    def check(self, options: SizeOptions) -> None:
        """Fail early (before any pixel is decoded) on a model or scale not served, or a
        named model and a scale that disagree."""
        if named(options):
            pipeline = self.get(options.model)
            if options.scale and options.scale != pipeline.scale:
                raise RequestError(
                    f"model {options.model!r} upscales x{pipeline.scale}, not the requested "
                    f"scale {options.scale}; drop one of the two"
                )
        elif options.scale:
            self.for_scale(options.scale)
        elif not self.models:
            self.default()

    def resolve(
        self, options: SizeOptions, width: int, height: int
    ) -> tuple[Pipeline, tuple[int, int]]:
        """The model to run on a ``width`` x ``height`` image and the final output size
        (the model's own when no sizing option is set)."""
        self.check(options)
        size = output_size(options, width, height)
        if named(options):
            pipeline = self.get(options.model)
        elif options.scale:
            pipeline = self.for_scale(options.scale)
        elif size is None:
            pipeline = self.default()
        else:
            largest = max(self.scales, default=0)
            factor = needed_factor(width, height, size, largest)
            pipeline = self.for_scale(smallest_scale(factor, self.scales))
        if size is None:
            return pipeline, (width * pipeline.scale, height * pipeline.scale)
        needed_factor(width, height, size, pipeline.scale, f"the scale of {pipeline.name}")
        return pipeline, size


def choose_defaults(
    models: Mapping[str, Pipeline], chosen: tuple[str, ...], precision: str = "auto"
) -> dict[int, str]:
    """Scale -> default model name: a ``chosen`` name of that scale, else ``rdn_x{scale}``,
    else the first float model of that scale by name (an int8 one where there is none); then,
    unless chosen by name, that model's int8 twin ``{name}_int8`` where ``precision`` says so
    (``int8_preferred``)."""
    defaults: dict[int, str] = {}
    for name in sorted(models, key=lambda n: (is_int8(models[n]), n)):
        scale = models[name].scale
        current = defaults.get(scale)
        if current is not None and is_int8(models[name]) and name not in chosen:
            continue
        preferred = name in chosen or (name == f"rdn_x{scale}" and current not in chosen)
        if current is None or preferred:
            defaults[scale] = name
    for scale, name in defaults.items():
        twin = models.get(f"{name}{INT8_SUFFIX}")
        if name not in chosen and twin is not None and int8_preferred(twin, precision):
            defaults[scale] = twin.name
    return defaults


def named(options: SizeOptions) -> bool:
    """The request names its model (``model=auto`` and an empty model leave it to the server)."""
    return options.model not in ("", AUTO_MODEL)


def choose_photos(
    models: Mapping[str, Pipeline], defaults: Mapping[int, str], precision: str = "auto"
) -> dict[int, str]:
    """Scale -> the photo model ``model=auto`` may choose: ``{clean}_photo`` beside the scale's
    default clean model ``{clean}`` (or ``{clean}_int8``), as its int8 twin where
    ``int8_preferred`` says so, as the defaults are chosen."""
    photos: dict[int, str] = {}
    for scale, name in defaults.items():
        clean = name.removesuffix(INT8_SUFFIX)
        photo = models.get(f"{clean}{PHOTO_SUFFIX}")
        twin = models.get(f"{clean}{PHOTO_SUFFIX}{INT8_SUFFIX}")
        if twin is not None and (twin.scale != scale or precision == "fp32"):
            twin = None
        if photo is not None and photo.scale == scale:
            preferred = twin is not None and int8_preferred(twin, precision)
            photos[scale] = twin.name if preferred and twin is not None else photo.name
        elif twin is not None:  # only the int8 photo model is served: it is the photo model
            photos[scale] = twin.name
    return photos


def is_int8(pipeline: Pipeline) -> bool:
    meta = pipeline.metadata
    return meta is not None and meta.precision == "int8"


def int8_preferred(twin: Pipeline, precision: str) -> bool:
    """Whether an int8 twin answers for its float model: always with --precision int8; with
    auto, on a CPU when the loss its export measured is within INT8_MAX_LOSS_DB."""
    if not is_int8(twin) or precision == "fp32":
        return False
    if precision == "int8":
        return True
    loss = twin.metadata.int8_loss_db if twin.metadata else None
    on_cpu = twin.engine.active_provider == CPU_PROVIDER
    return on_cpu and loss is not None and loss <= INT8_MAX_LOSS_DB


@dataclass(frozen=True)
class IndexEntry:
    """One model of the repository, loaded or not (Triton's RepositoryIndex entry)."""

    name: str
    path: Path | None
    state: str  # READY or UNAVAILABLE
    reason: str = ""
    version: int = 0


Loader = Callable[[Path, str, int], Awaitable[Pipeline]]
Warmer = Callable[[Pipeline], Awaitable[None]]


class ModelRepository:
    """The served models; ``load`` / ``unload`` / ``rescan`` swap them atomically.

    ``loader(path, name, version)`` opens one model (in a worker thread); ``warm(pipeline)``
    runs its warm-up. ``start`` only opens (the server warms every model up once bound);
    ``load`` and ``rescan`` warm a new version up before it replaces the old one.
    """

    def __init__(self, config: RepositoryConfig, loader: Loader, warm: Warmer) -> None:
        self.config = config
        self._loader = loader
        self._warm = warm
        self._files: dict[str, Path] = {}  # every known model file by name
        self._failures: dict[str, str] = {}  # name -> why its last load failed
        self._unloaded: set[str] = set()
        self._versions: dict[str, int] = {}
        self._snapshot = Snapshot()
        self._lock = asyncio.Lock()  # one change at a time
        self._listeners: list[Callable[[Snapshot], None]] = []

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def on_change(self, listener: Callable[[Snapshot], None]) -> None:
        """Call ``listener`` with every snapshot published from now on (on the event loop)."""
        self._listeners.append(listener)

    async def start(self) -> Snapshot:
        """Discover and load every model; any failure is fatal here (``RepositoryError``,
        ``MetadataError``, or what the loader raises)."""
        self._files = discover(self.config)
        if not self._files:
            where = self.config.model_dir or "the command line"
            raise RepositoryError(f"no ONNX model found in {where}; pass --model PATH.onnx")
        unknown = [n for n in self.config.defaults if n not in self._files]
        if unknown:
            raise RepositoryError(
                f"--default {', '.join(unknown)}: no such model; models found: "
                f"{', '.join(sorted(self._files))}"
            )
        if not self.config.models:  # the server default comes from the folder: check first
            self._check_default_scale(file_scales(self._files.values()))
        models: dict[str, Pipeline] = {}
        for name, path in self._files.items():
            models[name] = await self._load_file(name, path, warm=False)
        self._publish(models)
        if not self.config.models:
            self._check_default_scale({p.scale for p in models.values()})
        return self._snapshot

    def _check_default_scale(self, scales: set[int]) -> None:
        scale = self.config.default_scale
        if scales and scale not in scales:
            found = ", ".join(f"x{s}" for s in sorted(scales))
            raise RepositoryError(
                f"no x{scale} model in {self.config.model_dir} (scales found: {found}); pass "
                "--scale with one of those, or --model"
            )

    def _primary(self, models: Mapping[str, Pipeline], defaults: Mapping[int, str]) -> str:
        if self.config.models:
            first = next((n for n, p in self._files.items() if p == self.config.models[0]), None)
            if first in models:
                return first
        if self.config.default_scale in defaults:
            return defaults[self.config.default_scale]
        return defaults[min(defaults)] if defaults else ""

    def _publish(self, models: dict[str, Pipeline]) -> None:
        precision = self.config.precision
        defaults = choose_defaults(models, self.config.defaults, precision)
        photos = choose_photos(models, defaults, precision)
        self._snapshot = Snapshot(models, defaults, self._primary(models, defaults), photos)
        for listener in self._listeners:
            listener(self._snapshot)

    async def _load_file(self, name: str, path: Path, warm: bool = True) -> Pipeline:
        version = self._versions.get(name, 0) + 1
        pipeline = await self._loader(path, name, version)
        if warm:
            await self._warm(pipeline)
        self._versions[name] = version
        return pipeline

    def index(self) -> list[IndexEntry]:
        """Every model known, loaded or not, by name."""
        loaded = self._snapshot.models
        entries = []
        for name in sorted(set(self._files) | set(loaded)):
            if name in loaded:
                pipeline = loaded[name]
                # a failed reload shows while the old version serves on
                reason = self._failures.get(name, "")
                entries.append(IndexEntry(name, pipeline.path, READY, reason, pipeline.version))
                continue
            reason = self._failures.get(name) or (
                "unloaded" if name in self._unloaded else "not loaded"
            )
            entries.append(IndexEntry(name, self._files.get(name), UNAVAILABLE, reason))
        return entries

    async def _rescan_files(self) -> None:
        """Re-read the folder's file names (explicit files stay), in a worker thread (every
        file's metadata is parsed); a bad file is logged."""
        try:
            found = await asyncio.to_thread(discover, self.config, self._files)
        except RepositoryError as e:
            log.error("model repository re-scan: %s; keeping the previous file list", e)
            return
        self._files = found

    async def _file_of(self, name: str) -> Path | None:
        """The file of model ``name``: the one it was found in, when that file still carries
        the name (only that file is read: a load never pays for the folder's other, perhaps
        large, files), else whatever a re-read of the folder's names finds."""
        path = self._files.get(name)
        if path is not None and await asyncio.to_thread(_still_named, path, name):
            return path
        await self._rescan_files()
        return self._files.get(name)

    async def load(self, name: str) -> Pipeline:
        """(Re)load ``name`` from its file and serve it; ``NotFound`` when no file has that
        name, ``LoadFailed`` (old version still serving) when the file does not load."""
        check_name(name, "model name")
        async with self._lock:
            path = await self._file_of(name)
            if path is None:
                known = ", ".join(sorted(self._files)) or "none"
                raise NotFound(
                    f"no model file is named {name!r}; models in the repository: {known}"
                )
            pipeline = await self._try_load(name, path)
            models = dict(self._snapshot.models)
            models[name] = pipeline
            self._unloaded.discard(name)
            self._publish(models)
            log.info("model %s loaded from %s (version %d)", name, path, pipeline.version)
            return pipeline

    async def _try_load(self, name: str, path: Path) -> Pipeline:
        try:
            pipeline = await self._load_file(name, path)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            self._failures[name] = reason
            serving = (
                "; the previous version keeps serving" if name in self._snapshot.models else ""
            )
            log.error("model %s failed to load from %s: %s%s", name, path, reason, serving)
            raise LoadFailed(f"model {name!r} failed to load from {path.name}: {e}{serving}") from e
        self._failures.pop(name, None)
        return pipeline

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new calls cannot use it, calls in flight finish."""
        check_name(name, "model name")
        async with self._lock:
            if name not in self._snapshot.models:
                served = ", ".join(sorted(self._snapshot.models)) or "none"
                raise NotFound(f"model {name!r} is not loaded; loaded: {served}")
            models = {n: p for n, p in self._snapshot.models.items() if n != name}
            self._unloaded.add(name)
            self._publish(models)
            log.info("model %s unloaded", name)

    async def rescan(self) -> None:
        """SIGHUP: reload every file of the repository, load new ones, stop serving the ones
        whose file is gone. A file that fails keeps its old version serving."""
        async with self._lock:
            started = time.perf_counter()
            await self._rescan_files()
            models: dict[str, Pipeline] = {}
            for name, path in self._files.items():
                if name in self._unloaded:
                    continue
                try:
                    models[name] = await self._try_load(name, path)
                except LoadFailed:
                    if name in self._snapshot.models:
                        models[name] = self._snapshot.models[name]
            gone = sorted(set(self._snapshot.models) - set(models) - self._unloaded)
            self._publish(models)
            log.info(
                "model repository re-scanned: %d models served (%.2f s)%s",
                len(models),
                time.perf_counter() - started,
                f"; no longer served (file gone): {', '.join(gone)}" if gone else "",
            )
