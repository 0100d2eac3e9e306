"""The on-disk index: reproducible bytes, kill-and-resume, manifests, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from attribution import (
    GradientIndex,
    IndexConfig,
    IndexMismatchError,
    ProjectionConfig,
    build_index,
)
from attribution.manifest import verify_id
from attribution.store import completed_blocks
from tests.attribution.build_script import build
from tests.attribution.reference import assert_rows_close
from tests.attribution.tiny import (
    classification_fisher_loss,
    classification_loss,
    lm_batches,
    mlp_batches,
    tiny_mlp,
)

ROOT = Path(__file__).resolve().parents[2]


def index_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_index_bytes(tmp_path) -> None:
    a = build(str(tmp_path / "a"))
    b = build(str(tmp_path / "b"))
    fa, fb = index_files(a.root), index_files(b.root)
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []
    assert a.id == b.id and verify_id(a.manifest)


def _build_elsewhere(out: Path, dtype: str, **env: str) -> None:
    """build_script in a fresh process (its own allocations, so its own memory alignment)."""
    # Keep the caller's PYTHONPATH (CI runs these tests against an older transformers from one).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, **env}
    args = [sys.executable, "-m", "tests.attribution.build_script", str(out), "0", dtype]
    subprocess.run(args, cwd=ROOT, env=env, check=True, timeout=300)


def test_another_process_gives_the_same_bytes_and_another_cpu_the_same_rows(tmp_path) -> None:
    """What the README promises. A float64 model's rows are float32 roundings of float64
    gradients: another process with the same thread count writes the same bytes. A float32
    model's products round by the CPU's kernels, the BLAS's choices and the thread count: built
    again without vector kernels (ATEN_CPU_CAPABILITY=default, MKL held to SSE4.2) on one
    thread, its rows equal this process's to float32 precision, and only that is promised."""
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    here = build(str(tmp_path / "here"))
    _build_elsewhere(tmp_path / "there", "float64", **threads)
    assert index_files(tmp_path / "there") == index_files(here.root)

    here = build(str(tmp_path / "here32"), dtype="float32")
    other_cpu = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                 "OMP_NUM_THREADS": "1"}  # fmt: skip
    _build_elsewhere(tmp_path / "there32", "float32", **other_cpu)
    there = GradientIndex.open(tmp_path / "there32")
    rows = {
        k: np.concatenate([a for _, a in v.blocks()]) for k, v in (("here", here), ("there", there))
    }
    tokens = max(int(b.mask.sum(1).max()) for b in lm_batches(n=23, batch_size=2))
    assert_rows_close(rows["there"], rows["here"], here, tokens)
    # The comparison catches one projection row 1e-3 off: P_in's first row of the first layer
    # scales its block's first column (blocks are k_out × k_in, row-major).
    first = here.projectors()[0]
    a, b = here.build["layers"][0]["start"], here.build["layers"][0]["stop"]
    block = (
        rows["there"][:, a:b]
        .astype(np.float64)
        .reshape(len(rows["there"]), first.p_out.shape[0], -1)
    )
    block[:, :, 0] *= 1 + 1e-3
    off = rows["there"].astype(np.float64)
    off[:, a:b] = block.reshape(len(off), -1)
    with pytest.raises(AssertionError, match="rows"):
        assert_rows_close(off, rows["here"], here, tokens)


def test_other_seed_gives_other_projections(tmp_path) -> None:
    batches = mlp_batches()
    ids = set()
    for seed in (0, 1):
        cfg = IndexConfig(projection=ProjectionConfig(kind="random", k_in=2, k_out=2, seed=seed))
        ids.add(
            build_index(
                tiny_mlp(),
                classification_loss,
                batches,
                tmp_path / str(seed),
                cfg,
                fisher_loss=classification_fisher_loss,
                show_progress=False,
            ).id
        )
    assert len(ids) == 2


def test_killed_build_resumes_to_identical_index(tmp_path) -> None:
    reference = build(str(tmp_path / "reference"))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.attribution.build_script", str(out), "0.3"], cwd=ROOT, env=env
    )
    deadline = time.time() + 120
    while len(completed_blocks(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(completed_blocks(out))
    assert 2 <= partial < reference.build["blocks"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        GradientIndex.open(out)

    resumed = build(str(out))
    assert index_files(resumed.root) == index_files(reference.root)
    meta = resumed.metadata
    assert meta["example_id"].n_unique() == meta.height == reference.rows


def test_resume_with_other_settings_is_refused(tmp_path) -> None:
    batches = mlp_batches()
    cfg = IndexConfig(projection=ProjectionConfig(kind="random", k_in=2, k_out=2))
    build_index(
        tiny_mlp(),
        classification_loss,
        batches,
        tmp_path,
        cfg,
        fisher_loss=classification_fisher_loss,
        show_progress=False,
    )
    other = IndexConfig(projection=ProjectionConfig(kind="random", k_in=3, k_out=2))
    with pytest.raises(IndexMismatchError, match="other settings"):
        build_index(
            tiny_mlp(),
            classification_loss,
            batches,
            tmp_path,
            other,
            fisher_loss=classification_fisher_loss,
            show_progress=False,
        )


def test_manifest_and_metadata_describe_the_index(tmp_path) -> None:
    batches = mlp_batches(n=11, batch_size=4)
    cfg = IndexConfig(
        projection=ProjectionConfig(kind="random", k_in=2, k_out=3),
        rows_per_block=4,
        damping_factor=0.2,
    )
    index = build_index(
        tiny_mlp(),
        classification_loss,
        batches,
        tmp_path,
        cfg,
        fisher_loss=classification_fisher_loss,
        show_progress=False,
        model_info={"weights_sha256": "abc"},
        data_info={"shards": [{"name": "s0", "sha256": "def"}]},
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["id"] == index.id and verify_id(manifest)
    assert manifest["model"] == {"weights_sha256": "abc"}
    assert manifest["config"]["damping_factor"] == 0.2
    assert manifest["config"]["fisher_labels"] == "sampled"
    assert manifest["rows"] == 11 and len(manifest["blocks"]) == 3
    assert {"torch", "numpy", "python"} <= manifest["packages"].keys()
    meta = index.metadata
    assert meta.columns == [
        "row",
        "example_id",
        "shard",
        "provider",
        "token_count",
        "self_influence",
    ]
    assert meta["example_id"].to_list() == [f"ex{i}" for i in range(11)]
    assert (meta["self_influence"] > 0).all()
    assert pl.Series(np.load(index.block_files()[0]).shape).to_list() == [4, 2 * 3 * 2]
    tampered = {**manifest, "rows": 12}
    assert not verify_id(tampered)


def test_generator_data_is_refused_with_a_clear_message(tmp_path) -> None:
    gen = (b for b in mlp_batches())
    with pytest.raises(TypeError, match="re-iterable"):
        build_index(tiny_mlp(), classification_loss, gen, tmp_path, show_progress=False)


def test_settings_round_trip_and_older_manifests_keep_their_meaning() -> None:
    from attribution.config import IndexConfig, ProjectionConfig

    config = IndexConfig(
        projection=ProjectionConfig(
            modules=("h.*",), tied_head=False, head_projection="pca", head_k_out=None,
            per_layer=(("h.0", 3, 4),),
        )
    )  # fmt: skip
    assert IndexConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # A manifest written before the output-head settings existed: the tied head was skipped,
    # PCA covered every side, and the head's k_out was k_out.
    old = json.loads(json.dumps(IndexConfig().to_dict()))
    for key in ("tied_head", "head_projection", "head_k_out"):
        del old["projection"][key]
    del old["curvature"], old["fisher_labels"]
    restored = IndexConfig.from_dict(old)
    assert restored.projection.tied_head is False
    assert restored.projection.head_projection == "pca"
    assert restored.projection.dims_for("lm_head", 64, 1000, head=True) == (32, 32)
    assert (restored.curvature, restored.fisher_labels) == ("full", "data")
    assert IndexConfig().projection.dims_for("lm_head", 64, 50257, head=True) == (32, 1024)
    assert IndexConfig().projection.dims_for("lm_head", 64, 1000, head=True) == (32, 1000)


def test_factors_and_projections_that_share_memory_save_and_load_back(tmp_path) -> None:
    """One tensor object used for several layers, for A and S, or a view into a larger
    tensor: each is written as its own values (safetensors refuses shared memory)."""
    import torch

    from attribution.projection import KfacFactors, LayerProjector
    from attribution.store import load_factors, load_projectors, save_factors, save_projectors

    eye = torch.eye(3, dtype=torch.float64)
    big = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    factors = [KfacFactors("a", eye, eye, 5), KfacFactors("b", eye, 2 * eye, 7)]
    projectors = [LayerProjector("a", big[:2], big[2:4]), LayerProjector("b", big[:2], big.T)]
    save_factors(tmp_path / "f.safetensors", factors)
    save_projectors(tmp_path / "p.safetensors", projectors)
    got = load_factors(tmp_path / "f.safetensors", ["a", "b"])
    assert [(g.name, g.examples) for g in got] == [("a", 5), ("b", 7)]
    for g, f in zip(got, factors, strict=True):
        assert torch.equal(g.a, f.a) and torch.equal(g.s, f.s)
    back = load_projectors(tmp_path / "p.safetensors", ["a", "b"])
    for g, p in zip(back, projectors, strict=True):
        assert torch.equal(g.p_in, p.p_in) and torch.equal(g.p_out, p.p_out)
    assert torch.equal(big, torch.arange(24, dtype=torch.float32).reshape(6, 4))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _edit_manifest(path: Path) -> None:
    manifest = json.loads(path.read_text())
    manifest["rows"] += 1
    path.write_text(json.dumps(manifest))


DAMAGES = {
    "block cut short": ("blocks/grads-000000.npy", _truncate, "blocks/grads-000000.npy: "),
    "block missing": ("blocks/grads-000001.npy", Path.unlink, "blocks/grads-000001.npy: "),
    "curvature cut short": ("curvature.safetensors", _truncate, "curvature.safetensors: "),
    "metadata cut short": ("metadata.parquet", _truncate, "metadata.parquet: "),
    "projections missing": ("projections.safetensors", Path.unlink, "projections.safetensors: missing"),
    "manifest edited": ("manifest.json", _edit_manifest, "manifest.json: its content does not match its id"),
    "build settings unreadable": ("build.json", lambda p: p.write_text("{"), "build.json: "),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_index_is_refused_when_opened_naming_the_file(tmp_path, damage) -> None:
    from attribution.types import IndexDamagedError

    built = build_index(
        tiny_mlp(),
        classification_loss,
        mlp_batches(),
        tmp_path / "idx",
        IndexConfig(projection=ProjectionConfig(kind="random", k_in=2, k_out=2), rows_per_block=10),
        fisher_loss=classification_fisher_loss,
        show_progress=False,
    )
    assert built.build["blocks"] >= 2
    GradientIndex.open(built.root)  # intact: opens
    name, spoil, expected = DAMAGES[damage]
    spoil(built.root / name)
    with pytest.raises(IndexDamagedError) as err:
        GradientIndex.open(built.root)
    message = str(err.value)
    assert message.startswith(f"{built.root}: the gradient index is damaged ({expected}")
    assert "\n" not in message and "build the index again" in message
