"""WebDataset shards read as a stream (`data.stream`): split, shuffled, resumable, never all in memory.

Every process (torch.distributed rank) and every DataLoader worker of it is a *slot*; slot k of K (k =
rank x workers + worker) reads, in epoch e, the shards at k, k + K, k + 2K, ... of the shard list
permuted by (seed, e), so an epoch reads every shard exactly once over all slots.  A slot's samples pass
through a shuffle buffer of `shuffle_buffer` samples (after webdataset's: once the buffer is full each
new sample replaces a random one, which goes out; draining uses webdataset's `pick`) drawn by an RNG seeded by (seed, e, rank, worker).
A slot's stream is its epochs one after the other, endlessly.  A shard's members are grouped into
samples by webdataset's `group_by_keys`, keeping the members its `tar_file_iterator` keeps; the members
themselves are read by a lean tar reader here (`_Tar`), as tarfile's parsing made the stream a third
slower than reading PNG files.

Which samples a slot yields depends on nothing but those seeds and the shards, so a position is a count:
the trainer's micro-batches so far.  torch's DataLoader takes batches from its workers round-robin, so
batch b of a process came from worker b mod W, its (b div W)-th batch.  Resuming at batch b, worker w of
the new loader plays the slot of worker (b + w) mod W from its ((b + w) div W)-th batch on: it skips the
samples before, without decoding them; whole epochs by the shards' sample counts (read from the tar
headers alone), and within an epoch by replaying the shuffle on (shard, sample) numbers, then reading
only the samples still in the buffer and the rest of the current shard.

A shard's sample is usable when its member names hold what the stream's `usable` predicate asks for: by
default an image and a .txt or .json (formats.wds_usable: a caption, or a LLaVA record); a video, a
document or a lone image for the families that read those.  The others are passed over, as the in-memory
reader does.  A usable sample that then fails (a bad image, a caption-less or broken .json, a record that
is not LLaVA's) is yielded by the decoder as a bad-sample record, so the collate reports it and the trainer
counts it.  An unreadable or truncated tar shard is an error naming it: it would
silently lose up to a whole shard of samples, and a data set with a broken file wants fixing.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from glimpse.data.formats import PathLike, expand_shards, wds_usable
from glimpse.errors import GlimpseError

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset.tariterators.tar_file_iterator's skip_meta
_EMPTY = object()  # what a shuffle buffer gives back while it fills
Usable = Callable[[list[str]], bool]  # a sample's member suffixes -> whether the stream counts it


@dataclass
class ShardSample:
    """One usable sample of a shard: its members (lower-case suffix -> bytes) and the epoch reading it."""

    shard: str
    key: str
    files: dict[str, bytes]
    epoch: int

    @property
    def name(self) -> str:
        """The shard's file name and the sample's key (`train-0003.tar:abc`), as errors name the sample."""
        return f"{self.shard.rsplit('/', 1)[-1]}:{self.key}"

    def pick(self, options: list, seed: int):
        """One of `options` (a sample's captions), drawn by (seed, epoch, key): a replayed stream draws the same."""
        return options[zlib.crc32(f"{seed}:{self.epoch}:{self.key}".encode()) % len(options)]

    def member(self, suffixes) -> bytes:
        """The first member with one of `suffixes` (the stream's `usable` predicate made sure there is one)."""
        return next(self.files[ext] for ext in suffixes if ext in self.files)


class ShuffleBuffer:
    """A buffer shuffle after webdataset's (the drain is its `webdataset.filters.pick`), its state kept in the open so that a
    replay on placeholders can hand over to the real samples mid-way."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng, self.items = size, rng, []

    def push(self, item):
        """The item that goes out for `item` coming in, or _EMPTY while the buffer fills."""
        if self.size <= 1:
            return item
        if len(self.items) < self.size:
            self.items.append(item)
            return _EMPTY
        k = self.rng.randrange(self.size)
        out, self.items[k] = self.items[k], item
        return out

    def drain(self) -> Iterator:
        from webdataset.filters import pick

        while self.items:
            yield pick(self.items, self.rng)


_ZERO_BLOCK = bytes(512)
_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


class _Tar:
    """A tar file's members as webdataset's tar_file_iterator gives them ({"fname", "data"}: regular
    files, no __meta__ names), read with one header parse a member.  tarfile's own parsing, which
    tar_file_iterator uses, costs ~15x as much a member: a third of a 64-px sample's whole decoding
    time.  Reads ustar, GNU (long names) and pax (path, size) headers, plain or gzip/bz2/xz-compressed;
    a bad checksum, a cut member or header is an error, where tarfile would end the archive quietly."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            magic = f.read(6)
        opener = next((o for m, o in _COMPRESSED if magic.startswith(m)), None)
        self.size = None if opener else os.path.getsize(path)  # a plain file is skipped through by seeking
        self.f = opener(path, "rb") if opener else open(path, "rb", buffering=1 << 20)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def _read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) < n:
            raise tarfile.ReadError("unexpected end of data")
        return data

    def _skip(self, n: int) -> None:
        if self.size is None:
            self._read(n)
        elif self.f.seek(n, 1) > self.size:
            raise tarfile.ReadError("unexpected end of data")

    def members(self, data: bool = True) -> Iterator[dict]:
        """{"fname", "data"} of each member webdataset keeps; "data" None when not `data`."""
        pax: dict[str, str] = {}
        long_name, first = None, True
        while True:
            header = self.f.read(512)
            if not header and not first:
                return  # the end of the file at a header: a tar file without its end blocks
            if len(header) < 512:
                raise tarfile.ReadError("empty file" if first else "unexpected end of data")
            if header == _ZERO_BLOCK:
                return
            # the unsigned sum with the checksum field as spaces (tarfile also takes the signed one)
            chksum = _number(header[148:156])
            if chksum != sum(header) - sum(header[148:156]) + 256 and chksum not in tarfile.calc_chksums(header):
                raise tarfile.ReadError("bad checksum" if not first else "not a tar file")
            first = False
            kind = header[156:157]
            if kind in (b"x", b"g", b"L", b"K"):  # pax and GNU extension headers: about the next member
                size = _number(header[124:136])
                ext = self._read(size)
                self._skip(-size % 512)
                if kind == b"x":
                    pax = _pax_records(ext)
                elif kind == b"L":
                    long_name = tarfile.nts(ext, "utf-8", "surrogateescape")
                continue
            size = int(pax["size"]) if "size" in pax else _number(header[124:136])
            name = pax.get("path") or long_name or _ustar_name(header, kind)
            pax, long_name = {}, None
            if kind == b"S":
                raise tarfile.ReadError(f"{name}: a sparse member")
            if kind in (b"0", b"\0", b"7") and not name.endswith("/") and _keep(name):
                content = self._read(size) if data else None
                self._skip(-size % 512 if data else size + -size % 512)
                yield {"fname": name, "data": content, "__url__": self.path}
            else:
                self._skip(size + -size % 512)


def _number(field: bytes) -> int:
    """A header's number field: octal, or base-256 (GNU, for large values) as tarfile.nti reads it."""
    if field[0] >= 0o200:
        return tarfile.nti(field)
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError("invalid header") from None


def _ustar_name(header: bytes, kind: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if header[345] == 0:
        return name
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")  # as tarfile reads it
    return f"{prefix}/{name}" if kind not in tarfile.GNU_TYPES else name


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        match = re.match(rb"(\d+) ", data[pos:pos + 24])
        if match is None or int(match.group(1)) <= match.end():
            raise tarfile.ReadError("invalid pax header")
        end = pos + int(match.group(1))
        key, _, value = data[pos + match.end():end - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _keep(name: str) -> bool:
    """The names webdataset's tar_file_iterator keeps (no __meta__ files)."""
    if "__" not in name:
        return True
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return False
    return _SKIP_META.match(name) is None


_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)


def _unreadable(path: str, e: BaseException) -> GlimpseError:
    detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e.args[0]) if e.args else ""
    return GlimpseError(f"{path}: not a readable tar file ({detail or type(e).__name__})")


def _samples(path: str, data: bool, usable: Usable) -> Iterator[dict]:
    """A shard's usable samples, grouped by key with webdataset's group_by_keys."""
    from webdataset.tariterators import group_by_keys

    try:
        with _Tar(path) as tar:
            for sample in group_by_keys(tar.members(data)):
                if usable([k for k in sample if not k.startswith("__")]):
                    yield sample
    except _ERRORS as e:
        raise _unreadable(path, e) from None


def shard_keys(path: str, usable: Usable = wds_usable) -> list[str]:
    """The keys of a shard's usable samples, in order, from its tar headers alone (no member is read,
    a plain shard's are skipped by seeking): exactly the samples `read_shard` yields."""
    return [sample["__key__"] for sample in _samples(path, False, usable)]


def read_shard(path: str, usable: Usable = wds_usable) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members: lower-case suffix -> bytes) of a shard's usable samples, in order, streamed."""
    for sample in _samples(path, True, usable):
        yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


def _raw(sample: ShardSample) -> ShardSample:
    return sample


class ShardStream(IterableDataset):
    """The samples of WebDataset shards as an endless stream, each passed through `decode` (a picklable
    callable: ShardSample -> the item a map-style dataset would give).  See the module docstring."""

    def __init__(self, shards: PathLike | list[PathLike], decode: Callable[[ShardSample], object] = _raw, *,
                 seed: int = 0, shuffle_buffer: int = 1000, rank: int | None = None,
                 world_size: int | None = None, epochs: int | None = None, usable: Usable = wds_usable):
        import webdataset.tariterators  # noqa: F401  imported once here: forked loader workers inherit it

        self.paths = expand_shards(shards)
        self.decode, self.seed, self.shuffle_buffer, self.epochs = decode, seed, shuffle_buffer, epochs
        self.usable = usable  # which samples count, by their member names (a picklable function)
        if rank is None or world_size is None:  # read here, in the main process, not in a worker
            on = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        self.rank, self.world_size = rank, world_size
        self.start_batch, self.batch_size, self.workers = 0, 1, 1
        self._counts: dict[str, int] = {}

    # -- position ------------------------------------------------------------------------------------
    def position(self, batches: int) -> dict:
        """What a checkpoint records: `batches` micro-batches read by each process, and what they mean."""
        return {"batches": batches, "batch_size": self.batch_size, "processes": self.world_size,
                "workers": self.workers, "shards": len(self.paths), "shuffle_buffer": self.shuffle_buffer,
                "seed": self.seed}

    def start_at(self, batches: int, batch_size: int, workers: int, saved: dict | None = None) -> None:
        """Read from micro-batch `batches` on (of `batch_size` samples, per process), with `workers`
        DataLoader workers (0: none); `saved`, a checkpoint's position, must describe the same stream."""
        self.workers, self.batch_size, self.start_batch = max(1, workers), batch_size, batches
        slots = self.world_size * self.workers
        if len(self.paths) < slots:
            raise GlimpseError(f"data.stream: {len(self.paths)} shards cannot feed {self.world_size} process(es) x "
                               f"{self.workers} loader worker(s), each needs a shard: lower data.num_workers "
                               "or split the data into more shards")
        if saved is not None:
            now = self.position(batches)
            differ = [k for k in now if k != "batches" and saved.get(k) != now[k]]
            if differ:
                was = ", ".join(f"{k} {saved.get(k)}" for k in differ)
                raise GlimpseError(f"data.stream: the checkpoint's stream position was saved with {was}; this "
                                   f"run has {', '.join(f'{k} {now[k]}' for k in differ)}: resume with the same "
                                   "processes, data.num_workers, batch size and shards to read on exactly")
            if saved.get("batches") != batches:
                raise GlimpseError(f"data.stream: the checkpoint's stream position ({saved.get('batches')} batches) "
                                   f"does not match its step ({batches} batches)")

    def read(self, loader) -> Iterator:
        """Iterate `loader` (a DataLoader over this stream), a worker's GlimpseError raised again as its
        own line (torch wraps it in the worker's traceback)."""
        batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except GlimpseError as e:
                lines = str(e).strip().splitlines()
                if len(lines) > 1 and lines[0].startswith("Caught "):
                    raise GlimpseError(lines[-1].split(": ", 1)[-1]) from None
                raise
            yield batch

    # -- reading -------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers and self.start_batch:
            raise GlimpseError(f"data.stream: positioned for {self.workers} loader workers, read by {workers}")
        if len(self.paths) < self.world_size * workers:
            raise GlimpseError(f"data.stream: {len(self.paths)} shards cannot feed {self.world_size} process(es) x "
                               f"{workers} loader worker(s), each needs a shard")
        # this worker plays the slot whose next batch is the loader's next one from it (module docstring)
        slot, chunk = (self.start_batch + worker) % workers, (self.start_batch + worker) // workers
        for sample in self._slot(slot, workers, skip=chunk * self.batch_size):
            yield self.decode(sample)

    def _slot_shards(self, epoch: int, slot: int, workers: int) -> list[str]:
        order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(len(self.paths))
        return [self.paths[i] for i in order[self.rank * workers + slot::self.world_size * workers]]

    def _count(self, path: str) -> int:
        if path not in self._counts:
            self._counts[path] = len(shard_keys(path, self.usable))
        return self._counts[path]

    def _slot(self, slot: int, workers: int, skip: int) -> Iterator[ShardSample]:
        epoch, empty = 0, 0
        while self.epochs is None or epoch < self.epochs:
            shards = self._slot_shards(epoch, slot, workers)
            seed = np.random.SeedSequence([self.seed, epoch, self.rank, slot]).generate_state(2)
            rng = random.Random(int(seed[0]) << 32 | int(seed[1]))
            n = 0
            if skip:
                total = sum(self._count(p) for p in shards)
                if skip >= total:  # the whole epoch was read before
                    skip -= total
                    n = total
                else:
                    for sample in self._epoch(shards, rng, epoch, skip):
                        n += 1
                        yield sample
                    skip = 0
            else:
                for sample in self._epoch(shards, rng, epoch, 0):
                    n += 1
                    yield sample
            empty = 0 if n else empty + 1
            if empty > len(self.paths) and not any(self._count(p) for p in self.paths):
                raise GlimpseError(f"data.stream: no usable sample (members its family reads) in {len(self.paths)} "
                                   f"shards ({self.paths[0]}, ...)")
            epoch += 1

    def _epoch(self, shards: list[str], rng: random.Random, epoch: int, skip: int) -> Iterator[ShardSample]:
        buffer = ShuffleBuffer(self.shuffle_buffer, rng)
        start = (0, 0)  # the next (shard, sample) to push
        if skip:
            start = self._replay(shards, buffer, epoch, skip)
        for i in range(start[0], len(shards)):
            for j, (key, files) in enumerate(read_shard(shards[i], self.usable)):
                if i == start[0] and j < start[1]:
                    continue
                out = buffer.push(ShardSample(shards[i], key, files, epoch))
                if out is not _EMPTY:
                    yield out
        yield from buffer.drain()

    def _replay(self, shards: list[str], buffer: ShuffleBuffer, epoch: int, skip: int) -> tuple[int, int]:
        """Run the epoch's shuffle on (shard, sample) numbers until `skip` samples went out, then put the
        real samples in the buffer; returns the next (shard, sample) to push."""
        counts = [self._count(p) for p in shards]
        gone, start = 0, (len(shards), 0)
        for i, n in enumerate(counts):
            for j in range(n):
                if buffer.push((i, j)) is not _EMPTY:
                    gone += 1
                    if gone == skip:
                        start = (i, j + 1)
                        break
            if gone == skip:
                break
        drained = buffer.drain()
        while gone < skip:  # the skipped samples reach into the end of the epoch's draining
            next(drained)
            gone += 1
        wanted: dict[tuple[int, int], int] = {ij: k for k, ij in enumerate(buffer.items)}
        for i in sorted({i for i, _ in wanted}):
            last = max(j for s, j in wanted if s == i)
            for j, (key, files) in enumerate(read_shard(shards[i], self.usable)):
                if (i, j) in wanted:
                    buffer.items[wanted[i, j]] = ShardSample(shards[i], key, files, epoch)
                if j == last:
                    break
        return start
