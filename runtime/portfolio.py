"""Opening a portfolio on the device: untrusted input, validated before anything is used. Torch-free.

The file is memory-mapped (read once by the OS, inactive variants cost their deflated bytes at most, and only
while touched). Before zipfile reads its directory, the end record's entry count and directory size are checked
against the device profile's limits; then the directory (members neither overlapping nor shared, inside the file
before the directory) and the manifest are validated. Each variant is inflated into memory on demand, streamed
under a running cap at the size the manifest declares (itself capped by the profile's ``limits.variant_mb``)
whatever the ZIP headers say, its sha256 checked, and its graph read (``graph_check``: no external data, bounded
counts, allowed operators, the manifest's input) before ONNX Runtime sees it. Nothing is ever extracted to disk
and nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import struct
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgeshift.core.errors import PortfolioError, UnknownNameError, require_file
from edgeshift.core.jsonio import loads_bounded
from edgeshift.device_profiles.profile import LimitsSettings

from .graph_check import check_graph
from .manifest import (
    CHECKS_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    InputSpec,
    Manifest,
    VariantRecord,
    member_bytes,
    parse_manifest,
    variant_file,
)
from .nested import Splicer

_ALLOWED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


@dataclass(frozen=True)
class VariantInfo:
    """One variant as the manifest describes it, plus what it costs deflated in the file."""

    name: str
    bytes: int
    deflated_bytes: int
    sha256: str
    params: int
    macs: int
    compression: float
    reference: bool
    top1: float | None
    p95_ms: float | None
    record: VariantRecord  # the manifest's record of it, as validated


class Portfolio:
    """A validated, memory-mapped portfolio file. Use ``Portfolio.open(path)``."""

    def __init__(
        self, path: Path, fileobj, mm, zf: zipfile.ZipFile, manifest: Manifest, limits: LimitsSettings | None = None
    ):
        self.path = path
        self._file, self._mm, self._zip = fileobj, mm, zf
        self.manifest = manifest
        self.limits = limits or LimitsSettings()
        self._graphs_checked: set[str] = set()
        self._bases: dict[str, bytes] = {}  # inflated base variants of nested ones: the weights they slice
        self._splicers: dict[str, Splicer] = {}  # per nested variant: its verified skeleton, read against its base
        self._bases_lock = threading.Lock()
        infos = {i.filename: i for i in zf.infolist()}
        self.variants: list[VariantInfo] = []
        for v in manifest.variants:
            self.variants.append(
                VariantInfo(
                    name=v.name,
                    bytes=v.bytes,
                    deflated_bytes=infos[v.file].compress_size,
                    sha256=v.sha256,
                    params=v.params,
                    macs=v.macs,
                    compression=float(v.compression),
                    reference=v.reference,
                    top1=v.accuracy.top1 if v.accuracy else None,
                    p95_ms=v.latency.p95_ms if v.latency else None,
                    record=v,
                )
            )
        self._by_name = {v.name: v for v in self.variants}

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, limits: LimitsSettings | None = None) -> "Portfolio":
        """Open and validate ``path``; raise PortfolioError (one clear line) if it is not a sound portfolio.
        ``limits``: what it may cost (the device profile's ``[limits]``; default: their defaults)."""
        path = Path(path)
        limits = limits or LimitsSettings()
        require_file(path, "portfolio")
        f = open(path, "rb")
        try:
            if os.fstat(f.fileno()).st_size == 0:
                raise PortfolioError(f"{path} is empty, not a portfolio")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                _check_end_record(mm, path, limits.max_variants + 1)
                zf = zipfile.ZipFile(_MappedFile(mm))
            except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, struct.error) as exc:
                raise PortfolioError(f"{path} is not a portfolio: corrupt or truncated ZIP ({exc})") from None
            manifest = cls._check_directory_and_manifest(path, zf, limits)
            return cls(path, f, mm, zf, manifest, limits)
        except BaseException:
            f.close()
            raise

    @staticmethod
    def _check_directory_and_manifest(path: Path, zf: zipfile.ZipFile, limits: LimitsSettings) -> Manifest:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise PortfolioError(f"{path}: a member name appears twice")
        assert isinstance(zf.fp, _MappedFile)
        _check_no_overlap(zf.fp.mm, infos, zf.start_dir, path)
        for info in infos:
            if info.filename not in (MANIFEST_NAME, CHECKS_NAME) and not (
                info.filename.startswith("variants/")
                and info.filename.endswith(".onnx")
                and info.filename.count("/") == 1
                and ".." not in info.filename
            ):
                raise PortfolioError(
                    f"{path}: unexpected member {info.filename!r} (only {MANIFEST_NAME} and "
                    "variants/<name>.onnx belong in a portfolio)"
                )
            if info.compress_type not in _ALLOWED_METHODS:
                raise PortfolioError(
                    f"{path}: member {info.filename!r} uses compression method "
                    f"{info.compress_type}; only STORED and DEFLATE are accepted"
                )
            if info.flag_bits & 0x1:
                raise PortfolioError(f"{path}: member {info.filename!r} is encrypted")
        if MANIFEST_NAME not in names:
            raise PortfolioError(f"{path}: no {MANIFEST_NAME}; is this a portfolio built by edgeshift export?")
        raw = _read_capped(zf, zf.getinfo(MANIFEST_NAME), MAX_MANIFEST_BYTES, path)
        try:
            document = loads_bounded(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PortfolioError(f"{path}: {MANIFEST_NAME} is not valid JSON ({exc})") from None
        try:
            manifest = parse_manifest(document, limits.max_variants)
        except PortfolioError as exc:
            raise PortfolioError(f"{path}: {exc}") from None
        cap = limits.variant_mb * 2**20
        for v in manifest.variants:
            if v.bytes > cap:
                raise PortfolioError(
                    f"{path}: variant {v.name!r} declares {v.bytes:,} bytes, more than the {cap:,} the profile "
                    "allows (limits.variant_mb)"
                )
        declared = {v.file: v for v in manifest.variants}
        for name in names:
            if name != MANIFEST_NAME and name not in declared and not (name == CHECKS_NAME and manifest.checks):
                raise PortfolioError(f"{path}: member {name!r} is not declared in the manifest")
        if manifest.checks is not None:
            if CHECKS_NAME not in names or zf.getinfo(CHECKS_NAME).file_size != manifest.checks.bytes:
                raise PortfolioError(
                    f"{path}: {CHECKS_NAME} is missing or not the {manifest.checks.bytes} bytes declared"
                )
        for file, v in declared.items():
            if file not in names:
                raise PortfolioError(f"{path}: variant {v.name!r} is declared but {file} is missing")
            if zf.getinfo(file).file_size != member_bytes(v):
                raise PortfolioError(
                    f"{path}: {file} claims {zf.getinfo(file).file_size} bytes inflated, the manifest {member_bytes(v)}"
                )
        return manifest

    # -- access -------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variants]

    def info(self, name: str) -> VariantInfo:
        if name not in self._by_name:
            raise UnknownNameError("variant", name, self.names)
        return self._by_name[name]

    @property
    def pending(self) -> set[str]:
        """INT8 variants built on another CPU than the device's, untimed for it until its bench keeps them."""
        return {v.name for v in self.variants if v.record.device_timing == "pending"}

    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def median_variant(self) -> str:
        """The variant of median size (the lower one for an even count): where the runtime starts."""
        return self.variants[(len(self.variants) - 1) // 2].name

    def is_nested(self, name: str) -> bool:
        """Whether ``name`` is built from its base's weights in memory (sliced) rather than inflated whole."""
        return self.info(name).record.nested is not None

    def _chunks(self, name: str):
        v = self.info(name)
        return v, _member_chunks(self._zip, self._zip.getinfo(variant_file(name)), member_bytes(v.record), self.path)

    def _check_hash(self, v: VariantInfo, digest: str, what: str = "") -> None:
        """The member's digest against the manifest: the variant's sha256, or its skeleton's for a nested one."""
        nested = v.record.nested
        expected = nested.skeleton_sha256 if nested is not None and what == "" else v.sha256
        if digest != expected:
            raise PortfolioError(f"{self.path}: variant {v.name!r} fails its sha256 check{what} (tampered or corrupt)")

    def _base(self, name: str, pace: Pace | None) -> bytes:
        """The inflated, checked ONNX bytes of base variant ``name``, kept in memory once read: what every nested
        variant on it slices, so a switch between widths inflates nothing."""
        with self._bases_lock:
            data = self._bases.get(name)
            if data is None:
                data = self._bases[name] = self.inflate(name, pace)
            return data

    def release_bases(self) -> None:
        """Forget the base variants' bytes kept for slicing (the next nested build inflates its base again)."""
        with self._bases_lock:
            self._bases.clear()
            self._splicers.clear()

    def _assembled(self, name: str, pace: Pace | None) -> bytes:
        """A nested variant's ONNX bytes: its skeleton (inflated, sha256-checked) with its shared weights sliced
        from its base's (``edgeshift.runtime.nested``), the result sha256-checked and its graph checked. The
        skeleton is read once: later builds slice the base's weights, kept in memory, and check the result's
        sha256 again."""
        v = self.info(name)
        splicer = self._splicers.get(name)
        if splicer is None:
            _, chunks = self._chunks(name)
            nested = v.record.nested
            assert nested is not None
            digest, parts = hashlib.sha256(), []
            for chunk in _paced(chunks, pace):
                digest.update(chunk)
                parts.append(chunk)
            self._check_hash(v, digest.hexdigest())
            base = self._base(nested.base, pace)
            try:
                splicer = Splicer(b"".join(parts), base, [(w.name, w.ranges, w.scale) for w in nested.shared], v.bytes)
            except PortfolioError as exc:
                raise PortfolioError(f"{self.path}: variant {v.name!r} {exc}") from None
        try:
            data = splicer.build()
        except PortfolioError as exc:
            raise PortfolioError(f"{self.path}: variant {v.name!r} {exc}") from None
        self._check_hash(v, hashlib.sha256(data).hexdigest(), " once assembled from its base")
        self._check_graph(name, data)
        with self._bases_lock:
            self._splicers[name] = splicer
        return data

    def _check_graph(self, name: str, data) -> None:
        """Refuse a graph ONNX Runtime must not see (``graph_check``); once per variant, its bytes being fixed by
        the sha256 just checked."""
        if name in self._graphs_checked:
            return
        spec = self.manifest.input
        try:
            check_graph(
                data,
                input_name=spec.name,
                input_shape=spec.shape,
                max_nodes=self.limits.max_nodes,
                max_initializers=self.limits.max_initializers,
            )
        except PortfolioError as exc:
            raise PortfolioError(f"{self.path}: variant {name!r} {exc}") from None
        self._graphs_checked.add(name)

    def inflate(self, name: str, pace: Pace | None = None) -> bytes:
        """The ONNX bytes of ``name``, inflated in memory, capped at the declared size, sha256-checked, its graph
        checked (``graph_check``).

        ``pace``, if given, is called after each piece with the seconds that piece took (see ``Pace``). A nested
        variant is assembled from its skeleton and its base's weights (``_assembled``)."""
        if self.is_nested(name):
            return self._assembled(name, pace)
        v, chunks = self._chunks(name)
        digest, parts = hashlib.sha256(), []
        for chunk in _paced(chunks, pace):
            digest.update(chunk)
            parts.append(chunk)
        self._check_hash(v, digest.hexdigest())
        data = b"".join(parts)
        del parts
        self._check_graph(name, data)
        return data

    @contextlib.contextmanager
    def inflated_path(self, name: str, pace: Pace | None = None) -> Iterator[str | None]:
        """Inflate ``name`` into an anonymous in-memory file (Linux ``memfd``: RAM, never disk) and yield a path
        ONNX Runtime can read, after the sha256 has been checked; the file is gone on exit. Where memfd is
        missing, yields None: use ``inflate``. Reading by path keeps large copies out of the GIL. ``pace`` as in
        ``inflate``. A nested variant is assembled in memory: None, use ``inflate``."""
        if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd") or self.is_nested(name):
            yield None
            return
        v, chunks = self._chunks(name)
        fd = os.memfd_create(f"edgeshift-{name}", getattr(os, "MFD_CLOEXEC", 0))
        try:
            digest = hashlib.sha256()
            for chunk in _paced(chunks, pace):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            self._check_hash(v, digest.hexdigest())
            if name not in self._graphs_checked:
                with mmap.mmap(fd, v.bytes, access=mmap.ACCESS_READ) as written:
                    self._check_graph(name, written)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    def check_inputs(self) -> np.ndarray | None:
        """The preprocessed inputs shipped for the device's INT8 re-check (``manifest.checks``), inflated under its
        declared size, sha256-checked, read as a plain float32 ``.npy`` of the declared shape (never unpickled);
        None where the portfolio ships none."""
        c = self.manifest.checks
        if c is None:
            return None
        data = b"".join(_member_chunks(self._zip, self._zip.getinfo(CHECKS_NAME), c.bytes, self.path))
        if hashlib.sha256(data).hexdigest() != c.sha256:
            raise PortfolioError(f"{self.path}: {CHECKS_NAME} fails its sha256 check (tampered or corrupt)")
        shape = (c.count, *(int(d or 0) for d in self.input_spec.shape[1:]))
        try:
            stream = io.BytesIO(data)
            version = np.lib.format.read_magic(stream)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            header = read(stream)  # (shape, fortran order, dtype): parsed as a literal, never unpickled
        except (ValueError, OSError, SyntaxError) as exc:
            raise PortfolioError(f"{self.path}: {CHECKS_NAME} is not a plain .npy array ({exc})") from None
        if (
            tuple(header[0]) != shape
            or header[1]
            or header[2] != np.dtype("<f4")
            or stream.tell() + 4 * int(np.prod(shape)) != len(data)
        ):
            raise PortfolioError(f"{self.path}: {CHECKS_NAME} must hold float32 inputs shaped {list(shape)}")
        return np.frombuffer(data, np.float32, offset=stream.tell()).reshape(shape)

    def verify(self) -> None:
        """Inflate every variant, streaming (one piece in memory at a time), and check its size, CRC-32 and sha256;
        its graph is checked when it is first inflated for use. A nested variant's skeleton is checked so, then
        assembled from its base and checked again."""
        for name in self.names:
            v, chunks = self._chunks(name)
            digest = hashlib.sha256()
            for chunk in chunks:
                digest.update(chunk)
            self._check_hash(v, digest.hexdigest())
            if v.record.nested is not None:
                self._assembled(name, None)

    @property
    def file_bytes(self) -> int:
        return len(self._mm)

    def close(self) -> None:
        self._zip.close()
        self._mm.close()
        self._file.close()

    def __enter__(self) -> "Portfolio":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Pace = Callable[[float], None]
"""Called by a background inflation between pieces with the seconds the last piece took (inflating, checking
and copying it, including any wait for a core); it may sleep to leave the CPU to other work. The runtime uses
it to keep a switch from raising the latency of the requests it serves meanwhile."""


def _paced(chunks, pace: Pace | None):
    """Yield ``chunks``; after the caller has handled each one, report the time it all took to ``pace``."""
    if pace is None:
        yield from chunks
        return
    t = time.perf_counter()
    for chunk in chunks:
        yield chunk
        pace(time.perf_counter() - t)
        t = time.perf_counter()


class _MappedFile:
    """A memory map as the seekable file object zipfile expects (mmap lacks ``seekable``)."""

    def __init__(self, mm: mmap.mmap):
        self.mm = mm

    def seekable(self) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self.mm, name)


_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature ... name length, extra length (30 bytes)
_END_RECORD = struct.Struct("<4s4H2IH")  # signature, disk numbers, entries here / in all, directory size, offset
_END_SIGNATURE = b"PK\x05\x06"
_MAX_COMMENT = 0xFFFF


def _check_end_record(mm: mmap.mmap, path: Path, max_entries: int) -> None:
    """Before zipfile reads the central directory (a Python object per entry, all at once): the end record's entry
    count must be within ``max_entries`` and the directory's declared size within what that many entries take.
    A ZIP64 record (counts past 65,535) is refused: no portfolio holds that many members or 4 GB."""
    size = len(mm)
    tail_start = max(0, size - _END_RECORD.size - _MAX_COMMENT)
    at = mm.rfind(_END_SIGNATURE, tail_start)
    if at < 0 or at + _END_RECORD.size > size:
        return  # zipfile says what is wrong, in its words
    _, _, _, here, total, dir_size, dir_offset, _ = _END_RECORD.unpack_from(mm, at)
    if 0xFFFF in (here, total) or 0xFFFFFFFF in (dir_size, dir_offset):
        raise PortfolioError(f"{path}: a ZIP64 archive; a portfolio is a plain ZIP of a few members")
    if max(here, total) > max_entries or dir_size > max_entries * (46 + 0xFFFF * 3):
        raise PortfolioError(
            f"{path}: its ZIP directory declares {max(here, total)} members, more than the {max_entries - 1} "
            "variants and manifest the profile allows (limits.max_variants)"
        )


def _check_no_overlap(mm: mmap.mmap, infos: list[zipfile.ZipInfo], directory_start: int, path: Path) -> None:
    """Every member's bytes (local header to the end of its data) lie before the central directory and apart from
    every other member's: entries that share compressed bytes make a small file inflate many times over."""
    spans = []
    for info in infos:
        off = info.header_offset
        if off < 0 or off + _LOCAL_HEADER.size > directory_start:
            raise PortfolioError(f"{path}: member {info.filename!r} starts past the ZIP directory")
        fields = _LOCAL_HEADER.unpack_from(mm, off)
        spans.append((off, off + _LOCAL_HEADER.size + fields[-2] + fields[-1] + info.compress_size, info.filename))
    spans.sort()
    previous_end, previous = 0, ""
    for start, end, name in spans:
        if start < previous_end:
            raise PortfolioError(
                f"{path}: members {previous!r} and {name!r} overlap in the file (a ZIP built to inflate the same "
                "bytes twice)"
            )
        if end > directory_start:
            raise PortfolioError(f"{path}: member {name!r} runs into the ZIP directory")
        previous_end, previous = end, name


_IN_CHUNK = 256 * 1024  # compressed bytes fed to zlib per call (its unconsumed tail is copied with the GIL)
_OUT_CHUNK = 1024 * 1024  # inflated bytes per call: a few ms of work, so pacing can interleave it with requests


def _member_chunks(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, path: Path):
    """Yield the inflated bytes of one member in pieces, never more than ``cap`` in all (decompression bombs),
    then check the stream ended, the size and the CRC-32.

    The DEFLATE stream is read straight from the mapped file and inflated by zlib, which releases the GIL while
    it works (zipfile's reader loops in Python over 4 KiB pieces and holds it).
    """
    if info.file_size > cap:
        raise PortfolioError(f"{path}: {info.filename} declares {info.file_size} bytes, more than the {cap} allowed")
    mm = zf.fp.mm if isinstance(zf.fp, _MappedFile) else None
    if mm is None:
        raise PortfolioError(f"{path}: not memory-mapped")
    off = info.header_offset
    if off + _LOCAL_HEADER.size > len(mm):
        raise PortfolioError(f"{path}: {info.filename} is corrupt (local header past the end of the file)")
    fields = _LOCAL_HEADER.unpack_from(mm, off)
    if fields[0] != b"PK\x03\x04":
        raise PortfolioError(f"{path}: {info.filename} is corrupt (bad local header)")
    name_start = off + _LOCAL_HEADER.size
    if mm[name_start : name_start + fields[-2]] != info.orig_filename.encode() or fields[3] != info.compress_type:
        raise PortfolioError(f"{path}: {info.filename} is corrupt (its local header names another member or method)")
    start = off + _LOCAL_HEADER.size + fields[-2] + fields[-1]
    end = start + info.compress_size
    if end > len(mm):
        raise PortfolioError(f"{path}: {info.filename} is truncated")
    produced, crc = 0, 0
    stored = info.compress_type == zipfile.ZIP_STORED
    inflater = None if stored else zlib.decompressobj(-15)
    pos = start
    while pos < end:
        data = mm[pos : min(pos + _IN_CHUNK, end)]  # a small copy: no buffer export outlives an error
        pos += len(data)
        while data:
            room = min(cap + 1 - produced, _OUT_CHUNK)
            try:
                out = data[:room] if stored else inflater.decompress(data, room)
            except zlib.error as exc:
                raise PortfolioError(f"{path}: {info.filename} is corrupt ({exc})") from None
            data = data[room:] if stored else inflater.unconsumed_tail
            produced += len(out)
            if produced > cap:
                raise PortfolioError(
                    f"{path}: {info.filename} inflates past its declared {cap} bytes (decompression bomb?)"
                )
            crc = zlib.crc32(out, crc)
            if out:
                yield out
            if not stored and inflater.eof:
                break
        if not stored and inflater.eof:
            break
    if not stored and not inflater.eof:
        raise PortfolioError(f"{path}: {info.filename} is corrupt or truncated (DEFLATE stream does not end)")
    if produced != info.file_size or crc != info.CRC:
        raise PortfolioError(f"{path}: {info.filename} is corrupt (size or CRC-32 does not match the ZIP directory)")


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, path: Path) -> bytes:
    """Inflate one member into memory (see ``_member_chunks``)."""
    return b"".join(_member_chunks(zf, info, cap, path))
