"""On-disk format of the gradient index.

index_dir/
  build.json                 settings, layer layout, fingerprint of model and data
  projections.safetensors    P_in, P_out of every tracked layer
  factors.safetensors        projected KFAC factors of every layer (the EKFAC eigenbasis)
  blocks/grads-NNNNNN.npy    projected gradients, rows = examples (memory-mapped)
  blocks/meta-NNNNNN.parquet example id, shard, provider, token count of those rows;
                             its presence marks the block complete
  curvature.safetensors      per-layer Fisher eigenvectors, eigenvalues, damping
  metadata.parquet           all rows, with self-influence
  manifest.json              content-addressed manifest; present once the index is complete
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from attribution.config import IndexConfig
from attribution.curvature import Bases, Curvature, LayerSlice, kfac_bases
from attribution.files import follow_umask
from attribution.manifest import verify_id
from attribution.projection import KfacFactors, LayerProjector
from attribution.types import IndexDamagedError, first_line

BUILD_FILE = "build.json"
MANIFEST_FILE = "manifest.json"
PROJECTIONS_FILE = "projections.safetensors"
FACTORS_FILE = "factors.safetensors"
CURVATURE_FILE = "curvature.safetensors"
METADATA_FILE = "metadata.parquet"
BLOCKS_DIR = "blocks"

META_SCHEMA = {
    "example_id": pl.String,
    "shard": pl.String,
    "provider": pl.String,
    "token_count": pl.Int64,
}


def block_paths(root: Path, number: int) -> tuple[Path, Path]:
    d = root / BLOCKS_DIR
    return d / f"grads-{number:06d}.npy", d / f"meta-{number:06d}.parquet"


def completed_blocks(root: Path) -> list[int]:
    """Numbers of the complete blocks, which are always 0..n-1."""
    done = []
    while block_paths(root, len(done))[1].exists():
        done.append(len(done))
    return done


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(final)


def write_block(root: Path, number: int, grads: np.ndarray, meta: pl.DataFrame) -> None:
    """Write one block: gradients first, then its metadata, each atomically.

    A kill between the two leaves a gradients file without metadata: the block counts as not
    written, and a resumed build overwrites it.
    """
    gpath, mpath = block_paths(root, number)
    gpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = gpath.with_name(gpath.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(grads))
    _fsync_replace(tmp, gpath)
    tmp = mpath.with_name(mpath.name + ".tmp")
    meta.write_parquet(tmp)
    _fsync_replace(tmp, mpath)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, each contiguous and with storage of its own: safetensors refuses to save
    tensors that share memory (one factor object used for two layers, or for A and S)."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_projectors(path: Path, projectors: list[LayerProjector]) -> None:
    tensors = {}
    for p in projectors:
        tensors[f"{p.name}.p_in"] = p.p_in
        tensors[f"{p.name}.p_out"] = p.p_out
    tmp = path.with_name(path.name + ".tmp")
    save_file(_unshared(tensors), str(tmp))
    follow_umask(tmp)
    tmp.replace(path)


def load_projectors(path: Path, names: list[str]) -> list[LayerProjector]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: projections missing from the index")
    t = load_file(str(path))
    return [LayerProjector(n, t[f"{n}.p_in"], t[f"{n}.p_out"]) for n in names]


def save_factors(path: Path, factors: list[KfacFactors]) -> None:
    tensors = {}
    for f in factors:
        tensors[f"{f.name}.a"] = f.a.double()
        tensors[f"{f.name}.s"] = f.s.double()
        tensors[f"{f.name}.examples"] = torch.tensor([f.examples], dtype=torch.int64)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_unshared(tensors), str(tmp))
    follow_umask(tmp)
    _fsync_replace(tmp, path)


def load_factors(path: Path, names: list[str]) -> list[KfacFactors]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: KFAC factors missing from the index")
    t = load_file(str(path))
    return [KfacFactors(n, t[f"{n}.a"], t[f"{n}.s"], int(t[f"{n}.examples"][0])) for n in names]


def layer_slices(layers: list[dict]) -> list[LayerSlice]:
    return [
        LayerSlice(layer["name"], layer["start"], layer["stop"], (layer["k_out"], layer["k_in"]))
        for layer in layers
    ]


def _read_json(root: Path, name: str) -> dict:
    try:
        return json.loads((root / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexDamagedError(root, name, first_line(exc)) from exc


@dataclass
class GradientIndex:
    """A complete gradient index opened for reading; gradient blocks are memory-mapped."""

    root: Path
    build: dict
    manifest: dict
    curvature: Curvature

    @staticmethod
    def open(path: str | Path) -> GradientIndex:
        root = Path(path)
        if not (root / MANIFEST_FILE).exists():
            state = "incomplete (resume its build)" if (root / BUILD_FILE).exists() else "missing"
            raise FileNotFoundError(f"{root}: no gradient index here, it is {state}")
        build, manifest = (_read_json(root, name) for name in (BUILD_FILE, MANIFEST_FILE))
        if not verify_id(manifest):
            raise IndexDamagedError(root, MANIFEST_FILE, "its content does not match its id")
        try:
            curvature = Curvature.load(root / CURVATURE_FILE, layer_slices(build["layers"]))
        except Exception as exc:  # noqa: BLE001 - whatever the reader raises on a bad file
            raise IndexDamagedError(root, CURVATURE_FILE, first_line(exc)) from exc
        index = GradientIndex(root, build, manifest, curvature)
        index.check_files()
        return index

    def check_files(self) -> None:
        """Refuse, before any scoring, an index whose files are missing or cut short: every
        block holds the rows and width the manifest says, the metadata every row, and the
        projection and factor files exist. Reads headers only (`ledger verify` hashes them)."""
        for name in (PROJECTIONS_FILE, FACTORS_FILE):
            if not (self.root / name).is_file():
                raise IndexDamagedError(self.root, name, "missing")
        rows = 0
        for path in self.block_files():
            name = f"{BLOCKS_DIR}/{path.name}"
            try:
                block = np.load(path, mmap_mode="r")
            except Exception as exc:  # noqa: BLE001 - missing, truncated, not an array
                raise IndexDamagedError(self.root, name, first_line(exc)) from exc
            if block.ndim != 2 or block.shape[1] != self.dim:
                raise IndexDamagedError(
                    self.root, name, f"shape {block.shape}, expected (rows, {self.dim})"
                )
            rows += block.shape[0]
        if rows != self.rows:
            raise IndexDamagedError(
                self.root, BLOCKS_DIR, f"{rows} rows, the manifest says {self.rows}"
            )
        try:
            listed = pl.scan_parquet(self.root / METADATA_FILE).select(pl.len()).collect().item()
        except Exception as exc:  # noqa: BLE001 - missing or unreadable parquet
            raise IndexDamagedError(self.root, METADATA_FILE, first_line(exc)) from exc
        if listed != self.rows:
            raise IndexDamagedError(
                self.root, METADATA_FILE, f"{listed} rows, the manifest says {self.rows}"
            )

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def config(self) -> IndexConfig:
        return IndexConfig.from_dict(self.build["config"])

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def metadata(self) -> pl.DataFrame:
        """Row → example id, shard, provider, token count, self-influence (read on demand)."""
        return pl.read_parquet(self.root / METADATA_FILE)

    def metadata_columns(self, columns: list[str]) -> pl.DataFrame:
        """Only some metadata columns: scoring reads a few bytes per row, not the ids."""
        return pl.read_parquet(self.root / METADATA_FILE, columns=columns)

    @property
    def dim(self) -> int:
        return self.build["dim"]

    @property
    def checkpoints(self) -> int:
        """Further checkpoints the index was built over besides its model (0: the model alone)."""
        return int(self.build.get("fingerprint", {}).get("checkpoints", 0))

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.build["layers"]]

    def rows_metadata(self, rows: np.ndarray | list[int]) -> pl.DataFrame:
        """Metadata of just these rows (read by a filtered scan, not the whole table)."""
        wanted = pl.Series("row", np.unique(np.asarray(rows, dtype=np.int64)), dtype=pl.UInt32)
        return (
            pl.scan_parquet(self.root / METADATA_FILE)
            .filter(pl.col("row").is_in(wanted.implode()))
            .collect()
        )

    def provider_codes(self) -> tuple[list[str], np.ndarray]:
        """The providers (sorted) and each row's position among them (small unsigned ints).

        The provider column is decoded straight into an enum, so the per-row strings are never
        held in memory at once: scoring a large index reads about one byte per row here.
        """
        scan = pl.scan_parquet(self.root / METADATA_FILE).select("provider")
        providers = sorted(scan.unique().collect()["provider"].to_list())
        codes = (
            scan.select(pl.col("provider").cast(pl.Enum(providers)).to_physical())
            .collect()
            .to_series()
            .to_numpy()
        )
        return providers, codes

    @property
    def self_influence(self) -> np.ndarray:
        return self.metadata_columns(["self_influence"])["self_influence"].to_numpy()

    def projectors(self) -> list[LayerProjector]:
        return load_projectors(self.root / PROJECTIONS_FILE, self.layer_names)

    def factors(self) -> list[KfacFactors]:
        """Each layer's projected KFAC factors from the build's first pass."""
        return load_factors(self.root / FACTORS_FILE, self.layer_names)

    def bases(self) -> Bases:
        """Each layer's EKFAC eigenbasis (Q_out, Q_in)."""
        return kfac_bases(self.factors())

    def block_files(self) -> list[Path]:
        return [block_paths(self.root, i)[0] for i in range(self.build["blocks"])]

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, memory-mapped (rows, D) array) of every block, in row order."""
        start = 0
        for path in self.block_files():
            arr = np.load(path, mmap_mode="r")
            yield start, arr
            start += arr.shape[0]

    def dense(self) -> torch.Tensor:
        """Every stored gradient row as one float32 tensor; only for small indexes."""
        return torch.from_numpy(
            np.concatenate([np.asarray(a, np.float32) for _, a in self.blocks()])
        )
