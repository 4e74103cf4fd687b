"""Frozen-encoder features of the training images: VAE posteriors and text conditioning.

The VAE and the text encoder are frozen, so their outputs are computed once and reused
at every step (as DP-LDM and DPDM do). The VAE *posterior* (mean and std) is kept, not a
sample, so every augmentation draw samples a fresh latent ``mean + std * eps`` exactly as
diffusers' ``latent_dist.sample()`` would (then shifted and scaled by the VAE's factors, as SD3's and
Flux's scripts do). With flips on, both orientations are encoded. The text conditioning is the
family's (``models.families.encode_prompts``): token embeddings plus the pooled embeddings SDXL, SD3
and Flux condition on; SDXL's per-image size and crop ids are kept per image and orientation.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dpdiff.data.preprocess import crop_top_left, original_size, to_pixels
from dpdiff.data.records import ImageRecord
from dpdiff.models.families import encode_prompts, image_conditioning


class StringTable(Sequence):
    """A list of strings held as two tensors (UTF-8 bytes and offsets), memory-mapped from the feature store: one
    caption per distinct caption of a 10^6-record dataset would otherwise be 10^6 Python strings in every process
    (~80 bytes each, parsed from a JSON header). Reads like the list it replaces."""

    __slots__ = ("utf8", "offsets")

    def __init__(self, utf8: torch.Tensor, offsets: torch.Tensor):
        self.utf8, self.offsets = utf8, offsets

    @classmethod
    def of(cls, strings) -> StringTable:
        if isinstance(strings, StringTable):
            return strings
        encoded = [str(x).encode("utf-8") for x in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        utf8 = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return cls(torch.from_numpy(utf8), torch.from_numpy(offsets))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.utf8[a:b].numpy().tobytes().decode("utf-8")

    def __iter__(self):
        raw, off = self.utf8.numpy().tobytes(), self.offsets.tolist()
        for a, b in zip(off, off[1:]):
            yield raw[a:b].decode("utf-8")

    def __eq__(self, other) -> bool:
        try:
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        except TypeError:
            return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"StringTable({len(self)} strings)"


@dataclass
class EncodedData:
    latent_mean: torch.Tensor  # [N, F, C, h, w]; F = 2 (original, flipped) with flips, else 1
    latent_std: torch.Tensor  # [N, F, C, h, w]
    text_emb: torch.Tensor | None  # [M, T, D], one row per distinct caption; None: encoded per batch (on the fly)
    text_index: torch.Tensor  # [N] long: image -> caption row
    captions: Sequence[str]  # the M distinct captions, sorted (a StringTable when read from the store)
    scaling_factor: float
    shift_factor: float
    text_added: dict[str, torch.Tensor] = field(default_factory=dict)  # [M, ...] per caption: pooled embeddings
    image_added: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, F, ...] per image: SDXL's time ids

    @property
    def num_flips(self) -> int:
        return int(self.latent_mean.shape[1])

    def text_conditioning(self) -> dict[str, torch.Tensor]:
        """Everything that depends on the caption alone, one row per caption: the token embeddings
        (``encoder_hidden_states``) and the pooled ones; empty when captions are encoded per batch."""
        if self.text_emb is None:
            return {}
        return {"encoder_hidden_states": self.text_emb, **self.text_added}


def latent_factors(vae) -> tuple[float, float]:
    scale = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)
    return scale, float(shift) if shift is not None else 0.0


def encode_captions(base, captions: list[str], *, device, max_sequence_length: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """The text conditioning of ``captions`` by the base pipeline's frozen encoders, as
    :meth:`EncodedData.text_conditioning` lays it out ([M, ...] per key, float32 on the CPU)."""
    emb, added = encode_prompts(base.pipe, base.family, captions, device=device,
                                max_sequence_length=max_sequence_length)
    return {"encoder_hidden_states": emb, **added}


def encode_captions_fixed(base, captions: list[str], *, device, max_sequence_length: int | None = None,
                          chunk: int = 256) -> dict[str, torch.Tensor]:
    """``encode_captions`` in calls of exactly ``chunk`` captions, the last padded with empty captions and cut back.
    A kernel's choice, and so its rounding, may follow the batch size but not the other rows' values: each caption's
    rows are then the same whatever other captions the dataset holds (adding or removing a unit changes no other
    unit's conditioning, also in the last bit on GPUs whose GEMM picks algorithms by shape)."""
    return in_fixed_chunks(lambda c: encode_captions(base, c, device=device, max_sequence_length=max_sequence_length),
                           captions, chunk=chunk)


def in_fixed_chunks(encode, captions: list[str], *, chunk: int) -> dict[str, torch.Tensor]:
    """``encode`` (captions -> {key: [n, ...]}) called on exactly ``chunk`` captions at a time, the last call padded
    with empty captions and cut back (``encode_captions_fixed`` says why)."""
    parts = []
    for s in range(0, len(captions), chunk):
        part = list(captions[s : s + chunk])
        enc = encode(part + [""] * (chunk - len(part)))
        parts.append({k: v[: len(part)] for k, v in enc.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def image_added(family, image, *, resolution: int, flip: bool = False) -> dict[str, torch.Tensor]:
    """The per-image added conditioning of ``image`` as training sees it at ``resolution`` (SDXL's size and crop ids
    of the center crop ``to_pixels`` takes, in the mirrored image when flipped); empty for the other families."""
    if not family.image_added:
        return {}
    return image_conditioning(family, original_size=original_size(image),
                              crop_top_left=crop_top_left(image, resolution=resolution, flip=flip),
                              resolution=resolution)


@torch.no_grad()
def encode_dataset(records: list[ImageRecord], *, base, resolution: int, center_crop: bool, flips: bool, device,
                   batch_size: int = 32, progress: bool = True, max_sequence_length: int | None = None,
                   text: bool = True) -> EncodedData:
    """The features of ``records`` in memory, float32 (the feature store, ``encode_to_store``, is what runs with
    ``data.cache=true`` use: it holds one batch at a time)."""
    scale, shift = latent_factors(base.vae)
    orientations = (False, True) if flips else (False,)
    means, stds, added = [], [], []
    it = range(0, len(records), batch_size)
    for i in tqdm(it, desc="encoding images", disable=not progress, leave=False):
        m, sd, a = _encode_image_batch(records[i : i + batch_size], base=base, resolution=resolution,
                                       center_crop=center_crop, orientations=orientations, device=device)
        means.append(m)
        stds.append(sd)
        added.append(a)
    captions = sorted({r.text for r in records})
    index = {c: j for j, c in enumerate(captions)}
    cond = encode_captions_fixed(base, captions, device=device, max_sequence_length=max_sequence_length) if text \
        else {}
    keys = added[0].keys() if added else ()
    return EncodedData(
        latent_mean=torch.cat(means), latent_std=torch.cat(stds), text_emb=cond.pop("encoder_hidden_states", None),
        text_index=torch.tensor([index[r.text] for r in records], dtype=torch.long),
        captions=captions, scaling_factor=scale, shift_factor=shift, text_added=cond,
        image_added={k: torch.cat([a[k] for a in added]) for k in keys},
    )


# --- the on-disk cache ------------------------------------------------------------------------
def cache_key(*, records: list[ImageRecord], base_path: str, parts: list[str], resolution: int, center_crop: bool,
              flips: bool, dtype: str, max_sequence_length: int | None = None, text: bool = True) -> str:
    """Names what the cached features depend on: the images and captions, the frozen encoders, the transform."""
    import hashlib
    from pathlib import Path

    from dpdiff.data.records import fingerprint

    h = hashlib.sha256()
    h.update(fingerprint(records).encode())
    h.update(json.dumps([r.key for r in records]).encode())
    for part in ("vae", *parts):
        d = Path(base_path) / part
        if d.is_dir():
            for f in sorted(d.iterdir()):
                st = f.stat()
                h.update(f"{part}/{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        else:
            h.update(f"{base_path}/{part}".encode())
    h.update(json.dumps([resolution, center_crop, flips, dtype] + ([max_sequence_length] if max_sequence_length
                                                                   else []) + ([] if text else ["no text"])).encode())
    return h.hexdigest()[:24]


def _private_dir(d: Path) -> None:
    """The cache folder, user-only (0700): the features are derived from private images."""
    import os

    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)


#: the store's layout version (a store of another version is rewritten: its header differs)
STORE_FORMAT = "2"

#: storage dtypes of the feature cache (``data.feature_dtype``)
FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def save_encoded(data: EncodedData, path, *, dtype: str = "float32") -> None:
    """Write in-memory features as a user-only feature store (they are derived from private images), the floating
    features (latent posteriors, text rows) rounded to ``dtype``: the same file ``encode_to_store`` writes batch by
    batch (one writer, ``StoreWriter``). Rounding is a fixed function of each image (or caption) alone, applied
    before training: a unit's clipped gradient is still bounded by C, so the guarantee is untouched; only utility
    could move (fp16 keeps 11 significant bits, far below the noise DP-SGD adds)."""
    import os

    path = Path(path)
    text = data.text_conditioning()
    captions = StringTable.of(data.captions)
    specs = store_specs(n_images=len(data.text_index), n_captions=len(captions), flips=data.num_flips,
                        latent=tuple(data.latent_mean.shape[2:]), text={k: tuple(v.shape[1:]) for k, v in text.items()},
                        image_added={k: tuple(v.shape[2:]) for k, v in data.image_added.items()},
                        dtype=FEATURE_DTYPES[dtype], caption_bytes=len(captions.utf8))
    writer = StoreWriter(path.with_name(f".{path.name}.tmp-{os.getpid()}"), specs,
                         _store_metadata(data.scaling_factor, data.shift_factor, dtype))
    writer.create()
    _write_captions(writer, captions)
    writer.write("latent_mean", 0, data.latent_mean)
    writer.write("latent_std", 0, data.latent_std)
    writer.write("text_index", 0, data.text_index)
    for k, v in text.items():
        writer.write(_text_key(k), 0, v)
    for k, v in data.image_added.items():
        writer.write(f"image_added.{k}", 0, v)
    writer.close()
    os.replace(writer.path, path)


def load_encoded(path) -> EncodedData | None:
    """The cached features. safetensors maps the file (its tensors are views of the page cache, read when a batch
    indexes them): the processes of a node share one copy, and a process's private memory does not grow with N
    (``tests/training/test_precision_and_cache.py`` measures it). Floating features keep their storage dtype;
    ``RowBuilder`` casts the rows it gathers to float32."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STORE_FORMAT:
                return None  # another layout: recomputed
            t = {k: f.get_tensor(k) for k in f.keys()}
        return EncodedData(latent_mean=t["latent_mean"], latent_std=t["latent_std"], text_emb=t.get("text_emb"),
                           text_index=t["text_index"], captions=StringTable(t["captions.utf8"], t["captions.offsets"]),
                           scaling_factor=float(meta["scaling_factor"]), shift_factor=float(meta["shift_factor"]),
                           text_added={k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("text_added.")},
                           image_added={k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("image_added.")})
    except (OSError, KeyError, ValueError, RuntimeError, struct.error):
        return None  # a damaged cache is recomputed
    except Exception as err:  # safetensors raises its own SafetensorError for a malformed file
        if type(err).__name__ == "SafetensorError":
            return None
        raise


# --- writing the store in place, batch by batch, by every process, resumably ---------------------------------
_ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64",
             torch.uint8: "U8"}
_NP_STORAGE = {torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float32: np.float32, torch.int64: np.int64,
               torch.uint8: np.uint8}


class StoreWriter:
    """A safetensors file written in place: the header (names, dtypes, shapes, offsets, metadata) first, then
    each tensor's rows through a writable memory map, batch by batch, so the encoder never holds more than one
    batch. safetensors itself only writes whole in-memory tensors (``save_file``); the format is an 8-byte header
    length, a JSON header (padded to 8 bytes) and the raw little-endian data, so the layout is written here and
    read back by safetensors (``load_encoded``). Several processes may fill disjoint rows of one file (``open``)."""

    def __init__(self, path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        import math

        self.path, self.specs = Path(path), dict(specs)
        header, offset = {}, 0
        self.offsets = {}
        for name, (dt, shape) in self.specs.items():
            nbytes = math.prod(shape) * torch.tensor([], dtype=dt).element_size()
            header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = (offset, nbytes)
            offset += nbytes
        header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header = struct.pack("<Q", len(raw)) + raw
        self.size = len(self.header) + offset
        self._maps: dict[str, np.memmap] = {}

    def create(self) -> None:
        """Write the header and size the file (sparse: unwritten rows take no disk)."""
        import os

        _private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, self.header)
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)

    def matches(self) -> bool:
        """Whether the file on disk has exactly this header and size (a partial store of the same features)."""
        try:
            with open(self.path, "rb") as f:
                return f.read(len(self.header)) == self.header and self.path.stat().st_size == self.size
        except OSError:
            return False

    def _map(self, name: str) -> np.memmap:
        if name not in self._maps:
            dt, shape = self.specs[name]
            begin, nbytes = self.offsets[name]
            if nbytes == 0:
                return np.zeros(shape, dtype=_NP_STORAGE[dt])
            self._maps[name] = np.memmap(self.path, dtype=_NP_STORAGE[dt], mode="r+",
                                         offset=len(self.header) + begin, shape=shape)
        return self._maps[name]

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        dt, _ = self.specs[name]
        t = rows.detach().to("cpu", dt).contiguous()
        arr = t.view(torch.int16).numpy().view(np.uint16) if dt == torch.bfloat16 else t.numpy()
        self._map(name)[start : start + len(arr)] = arr

    def flush(self) -> None:
        for m in self._maps.values():
            m.flush()

    def close(self) -> None:
        """Flush and drop the maps (the file can then be renamed and read)."""
        self.flush()
        self._maps.clear()


def _text_key(key: str) -> str:
    """The store's name of a text-conditioning key (``EncodedData.text_conditioning``)."""
    return "text_emb" if key == "encoder_hidden_states" else f"text_added.{key}"


def _store_metadata(scale: float, shift: float, dtype: str) -> dict[str, str]:
    return {"format": STORE_FORMAT, "scaling_factor": repr(scale), "shift_factor": repr(shift), "feature_dtype": dtype}


def _write_captions(writer: StoreWriter, captions: StringTable) -> None:
    writer.write("captions.utf8", 0, captions.utf8)
    writer.write("captions.offsets", 0, captions.offsets)


def _done_jobs(progress_dir: Path) -> set[str]:
    """The batches every process noted as written (``done-*`` files of ``encode_to_store``)."""
    done: set[str] = set()
    for f in progress_dir.glob("done-*"):
        done |= {line for line in f.read_text().splitlines() if line}
    return done


def store_specs(*, n_images: int, n_captions: int, flips: int, latent: tuple[int, ...], text: dict[str, tuple],
                image_added: dict[str, tuple], dtype: torch.dtype, caption_bytes: int) -> dict:
    """The tensors of the feature store: per image the posterior (mean, std) of each orientation and its added
    conditioning (float32), per distinct caption the text conditioning, each image's caption row, and the distinct
    captions themselves (UTF-8 bytes and offsets, ``StringTable``)."""
    specs = {"latent_mean": (dtype, (n_images, flips, *latent)), "latent_std": (dtype, (n_images, flips, *latent)),
             "text_index": (torch.int64, (n_images,)),
             "captions.utf8": (torch.uint8, (caption_bytes,)), "captions.offsets": (torch.int64, (n_captions + 1,))}
    for k, shape in text.items():
        specs[_text_key(k)] = (dtype, (n_captions, *shape))
    for k, shape in image_added.items():
        specs[f"image_added.{k}"] = (torch.float32, (n_images, flips, *shape))
    return specs


def _encode_image_batch(records, *, base, resolution: int, center_crop: bool, orientations, device):
    """(mean [B, F, ...], std [B, F, ...], added {key: [B, F, ...]}) of a batch of records, float32 on the CPU."""
    vae, family = base.vae, base.family
    images = [r.open() for r in records]
    means, stds = [], []
    for flip in orientations:
        px = torch.stack([to_pixels(im, resolution=resolution, center_crop=center_crop, flip=flip) for im in images])
        post = vae.encode(px.to(device=device, dtype=vae.dtype)).latent_dist
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    per = [[image_added(family, im, resolution=resolution, flip=flip) for flip in orientations] for im in images]
    keys = per[0][0].keys() if per else ()
    added = {k: torch.stack([torch.stack([f[k] for f in p]) for p in per]) for k in keys}
    return torch.stack(means, 1), torch.stack(stds, 1), added


@torch.no_grad()
def encode_to_store(records: list[ImageRecord], path, *, base, resolution: int, center_crop: bool, flips: bool,
                    device, dtype: str = "float16", batch_size: int = 32, caption_batch_size: int = 256,
                    progress: bool = True, max_sequence_length: int | None = None, proc=None,
                    text: bool = True) -> None:
    """Encode ``records`` into the feature store at ``path``, every process a share of the batches, resumably.

    The store is written to ``path + ".partial"`` (``StoreWriter``): its header first, then each batch of images
    and of distinct captions in place, each finished batch noted in ``path + ".progress/"``, so a crash keeps what
    was done and a re-run encodes only the rest (also with another number of processes). The processes share the
    batches round-robin over everyone who sees the same file: on a filesystem shared by all nodes one node's
    encode serves all; on node-local disks each node encodes its own copy (a token file decides which). Memory:
    one batch per process, whatever N. ``proc``: the ``ProcessContext`` (None: one process). ``text=False``: no
    text rows (captions encoded per batch during training, ``data.text_features=on_the_fly``: for long text
    features such as Flux's T5-512, 8 MB a caption). Collective: every process calls it, also where the store
    already exists."""
    import os
    import secrets
    import shutil

    from dpdiff.runtime import gather_objects

    path = Path(path)
    rank = proc.rank if proc is not None else 0
    barrier = proc.barrier if proc is not None else (lambda: None)
    have = path.exists()
    if all(gather_objects(have)):
        return
    if not records:
        raise ValueError("encode_to_store: no records")
    store = FEATURE_DTYPES[dtype]
    orientations = (False, True) if flips else (False,)
    captions = sorted({r.text for r in records})
    msl = max_sequence_length
    # the shapes, from one image and one caption (every process computes the same header)
    m0, _, added0 = _encode_image_batch(records[:1], base=base, resolution=resolution, center_crop=center_crop,
                                        orientations=orientations, device=device)
    t0 = encode_captions(base, captions[:1], device=device, max_sequence_length=msl) if text else {}
    scale, shift = latent_factors(base.vae)
    table = StringTable.of(captions)
    specs = store_specs(n_images=len(records), n_captions=len(captions), flips=len(orientations),
                        latent=tuple(m0.shape[2:]), text={k: tuple(v.shape[1:]) for k, v in t0.items()},
                        image_added={k: tuple(v.shape[2:]) for k, v in added0.items()}, dtype=store,
                        caption_bytes=len(table.utf8))
    writer = StoreWriter(path.with_name(path.name + ".partial"), specs, _store_metadata(scale, shift, dtype))
    progress_dir = path.with_name(path.name + ".progress")
    # who shares the file: if every process sees rank 0's fresh token, the disk is shared by all (one encode
    # serves every node); otherwise each node's processes fill their node's own copy
    token = secrets.token_hex(8)
    if rank == 0 and not have:
        _private_dir(path.parent)
        progress_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (progress_dir / "token").write_text(token)
    barrier()
    first = gather_objects(token)[0]
    tok = progress_dir / "token"
    shared = all(gather_objects(have or (tok.exists() and tok.read_text() == first)))
    node = "" if shared else os.uname().nodename
    nodes = gather_objects(node)
    peers = [r for r, n in enumerate(nodes) if n == node]
    leader = peers[0]
    if rank == leader and not have:
        _private_dir(path.parent)
        progress_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not writer.matches():  # no partial store of these features: start one
            writer.create()
            for f in progress_dir.glob("done-*"):
                f.unlink()
    barrier()
    jobs = [f"c{i}" for i in range(0, len(captions), caption_batch_size)] if text else []
    jobs += [f"i{i}" for i in range(0, len(records), batch_size)]
    if not have:
        done = _done_jobs(progress_dir)
        todo = [j for j in jobs if j not in done]
        mine = todo[peers.index(rank)::len(peers)]
        log_path = progress_dir / f"done-{rank}-{token}"
        if rank == leader:
            index = {c: j for j, c in enumerate(captions)}
            writer.write("text_index", 0, torch.tensor([index[r.text] for r in records], dtype=torch.long))
            _write_captions(writer, table)
            del index
        bar = tqdm(mine, desc=f"encoding ({len(done)} of {len(jobs)} batches already done)", disable=not progress,
                   leave=False)
        with open(log_path, "a") as log_file:
            for job in bar:
                start = int(job[1:])
                if job[0] == "c":
                    text = encode_captions_fixed(base, captions[start : start + caption_batch_size], device=device,
                                                 max_sequence_length=msl, chunk=caption_batch_size)
                    for k, v in text.items():
                        writer.write(_text_key(k), start, v)
                else:
                    mean, std, added = _encode_image_batch(records[start : start + batch_size], base=base,
                                                           resolution=resolution, center_crop=center_crop,
                                                           orientations=orientations, device=device)
                    writer.write("latent_mean", start, mean)
                    writer.write("latent_std", start, std)
                    for k, v in added.items():
                        writer.write(f"image_added.{k}", start, v)
                writer.flush()  # the rows are on disk before the batch is noted as done
                log_file.write(job + "\n")
                log_file.flush()
        writer.close()
    barrier()
    if rank == leader and not have:
        done = _done_jobs(progress_dir)
        missing = [j for j in jobs if j not in done]
        if missing:
            raise RuntimeError(f"feature store {path}: {len(missing)} batches were not encoded")
        os.chmod(writer.path, 0o600)
        os.replace(writer.path, path)
        shutil.rmtree(progress_dir, ignore_errors=True)
    barrier()


@dataclass(frozen=True)
class FeatureCache:
    """The user-only disk cache of frozen-encoder features: one memory-mapped store per (images and captions,
    frozen encoders, transform), named by ``cache_key``, so a changed image, caption, encoder file, resolution,
    crop, flip or dtype encodes anew and an unchanged one is read back without encoding. The features are derived
    from private images: the folder is 0700 (``_private_dir``) and ``dpdiff clean`` deletes it
    (:meth:`entries`)."""

    root: Path

    @classmethod
    def default(cls) -> FeatureCache:
        from dpdiff.paths import home

        return cls(home() / "cache")

    @classmethod
    def for_data(cls, cache_dir: str | None) -> FeatureCache:
        """``data.cache_dir`` (None: ``$DPDIFF_HOME/cache``)."""
        return cls(Path(cache_dir).expanduser()) if cache_dir else cls.default()

    def path(self, records: list[ImageRecord], *, base, resolution: int, center_crop: bool, flips: bool,
             frozen_dtype: str, feature_dtype: str, max_sequence_length: int | None, text: bool) -> Path:
        key = cache_key(records=records, base_path=base.path, parts=base.text_parts(),
                        dtype=f"{frozen_dtype}/{feature_dtype}", max_sequence_length=max_sequence_length, text=text,
                        resolution=resolution, center_crop=center_crop, flips=flips)
        return self.root / f"features-{key}.safetensors"

    def features(self, records: list[ImageRecord], *, base, device, resolution: int, center_crop: bool,
                 flips: bool, frozen_dtype: str, feature_dtype: str, max_sequence_length: int | None = None,
                 text: bool = True, progress: bool = True, proc=None) -> tuple[EncodedData, Path]:
        """The records' features and the store holding them: read back when the store for exactly these inputs
        exists, else encoded into it first (every process a share, resumably: ``encode_to_store``). Collective:
        every rank calls it, also when the store exists."""
        path = self.path(records, base=base, resolution=resolution, center_crop=center_crop, flips=flips,
                         frozen_dtype=frozen_dtype, feature_dtype=feature_dtype,
                         max_sequence_length=max_sequence_length, text=text)
        encode_to_store(records, path, base=base, resolution=resolution, center_crop=center_crop, flips=flips,
                        device=device, dtype=feature_dtype, progress=progress, max_sequence_length=max_sequence_length,
                        proc=proc, text=text)
        enc = load_encoded(path)
        if enc is None:
            raise RuntimeError(f"feature cache {path} could not be read back")
        return enc, path

    def entries(self) -> list[Path]:
        """What the cache holds (stores, partial stores and their progress notes); [] when there is none."""
        return sorted(self.root.iterdir()) if self.root.is_dir() else []
