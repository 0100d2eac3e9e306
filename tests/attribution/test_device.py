"""Device placement on a machine without a GPU: what `--device` accepts, the block writer's
thread, and the device scoring pass (run on the CPU) against the memory-mapped CPU pass."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
import torch

from attribution import IndexConfig, ProjectionConfig, ScoreConfig, build_index, score
from attribution.device import batch_on, resolve_device, resolve_precision
from attribution.scoring import _inverse_sqrt, _score_pass, _score_pass_torch, query_gradients
from attribution.store import block_paths, completed_blocks
from attribution.writer import BlockWriter
from tests.attribution.tiny import lm_batches, lm_fisher_loss, lm_loss, tiny_gpt2
from tests.tolerance import assert_close_f32


def test_auto_is_the_cpu_without_a_gpu_and_cpu_is_accepted(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_an_unavailable_gpu_is_refused_in_one_line(monkeypatch, spec: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=rf"^device '{spec}' is not available: .*--device cpu"):
        resolve_device(spec)


def test_unknown_devices_and_precisions_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=re.escape("unknown device 'tpu' (auto, cpu, cuda")):
        resolve_device("tpu")
    with pytest.raises(ValueError, match=re.escape("unknown precision 'int8' (float32, bf")):
        resolve_precision("int8")
    assert resolve_precision("bfloat16") is torch.bfloat16
    assert resolve_precision(None) is torch.float32


def test_a_batch_on_its_device_is_the_same_object() -> None:
    batch = lm_batches()[0]
    assert batch_on(batch, torch.device("cpu")) is batch


def rows_and_meta(n: int, d: int, first: int = 0, rows_per_block: int = 2):
    """Rows first .. first + n - 1 of an index: (g, meta, ids, block numbers)."""
    g = torch.arange(first * d, (first + n) * d, dtype=torch.float32).reshape(n, d) / 7
    ids = [f"ex{first + i}" for i in range(n)]
    meta = [{"example_id": i, "shard": "s", "provider": "p", "token_count": 3} for i in ids]
    return g, meta, ids, [(first + i) // rows_per_block for i in range(n)]


@pytest.mark.parametrize("total", [None, 13])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_writer_thread_writes_the_rows_in_order_in_blocks(tmp_path, dtype, total) -> None:
    """13 rows in blocks of 5: the last block of 3 is written at the end without a total,
    as soon as complete with one."""
    batches = [rows_and_meta(n, 4, first, 5) for n, first in ((3, 0), (5, 3), (1, 8), (4, 9))]
    with BlockWriter(tmp_path, 5, dtype, total) as writer:
        for batch in batches:
            writer.add(*batch)
    assert completed_blocks(tmp_path) == [0, 1, 2]
    stored = [np.load(block_paths(tmp_path, i)[0]) for i in range(3)]
    assert [s.shape[0] for s in stored] == [5, 5, 3] and stored[0].dtype == np.dtype(dtype)
    expected = torch.cat([b[0] for b in batches]).numpy().astype(dtype)
    np.testing.assert_array_equal(np.concatenate(stored), expected)
    ids = pl.concat([pl.read_parquet(block_paths(tmp_path, i)[1]) for i in range(3)])
    assert ids["example_id"].to_list() == [f"ex{i}" for i in range(13)]


def test_a_bad_row_stops_the_writer_and_is_raised_naming_its_example(tmp_path) -> None:
    g, meta, _, blocks = rows_and_meta(4, 3, first=2)
    g[2, 1] = torch.nan
    bad = [f"x{i}" for i in range(4)]
    with pytest.raises(ValueError, match="gradient of training example 'x2' is not finite"):  # noqa: PT012
        with BlockWriter(tmp_path, 2, "float32") as writer:
            writer.add(*rows_and_meta(2, 3))
            writer.add(g, meta, bad, blocks)
            for n in range(10):  # raised by a later add, or at the end
                writer.add(*rows_and_meta(2, 3, first=6 + 2 * n))
    assert completed_blocks(tmp_path) == [0]  # the block before the bad batch stays
    big = torch.full((1, 3), 1e6)
    with pytest.raises(ValueError, match="beyond float16's largest 65504"):  # noqa: PT012
        with BlockWriter(tmp_path / "f16", 2, "float16") as writer:
            writer.add(big, meta[:1], ["huge"], [0])
    with pytest.raises(ValueError, match="yielded fewer than the 5 examples"):  # noqa: PT012
        with BlockWriter(tmp_path / "short", 2, "float32", total=5) as writer:
            writer.add(*rows_and_meta(3, 3))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model, batches = tiny_gpt2(), lm_batches(n=22, batch_size=5)
    config = IndexConfig(projection=ProjectionConfig(kind="random", k_in=4, k_out=3),
                         rows_per_block=4, dtype="float16")  # fmt: skip
    root = tmp_path_factory.mktemp("index")
    index = build_index(model, lm_loss, batches, root, config, fisher_loss=lm_fisher_loss,
                        show_progress=False, device="cpu")  # fmt: skip
    _, q = query_gradients(model, lm_loss, lm_batches(n=6, seed=5), index, device="cpu")
    return index, q


@pytest.mark.parametrize("budget", [0, 1])
def test_the_device_scoring_pass_equals_the_memory_mapped_one(built, budget: int) -> None:
    """The pass that runs on a GPU, here on the CPU: same provider sums, top examples and
    dense scores as the CPU pass, across many chunks (budget 0: one row at a time)."""
    index, q = built
    config = ScoreConfig(dense=True, top_k=4, memory_budget_mb=budget)
    providers, codes = index.provider_codes()
    inv = _inverse_sqrt(index.self_influence)
    cpu = _score_pass(index, q, config, codes, inv, len(providers))
    dev = _score_pass_torch(index, q, config, codes, inv, len(providers), torch.device("cpu"))
    np.testing.assert_array_equal(dev[4], cpu[4])  # dense: the same float32 products
    np.testing.assert_array_equal(dev[5], cpu[5])
    np.testing.assert_array_equal(dev[2], cpu[2])  # top rows
    np.testing.assert_array_equal(dev[3], cpu[3])
    # Provider sums: float32 sums over ≤ rows terms, in another order, of the same scores.
    for got, want in ((dev[0], cpu[0]), (dev[1], cpu[1])):
        scale = np.abs(cpu[4]).astype(np.float64) @ np.eye(len(providers))[codes]
        assert_close_f32(got, want, index.rows, scale=scale, what="provider sums")
    # `score` takes the CPU pass on the CPU, whatever asks for it.
    result = score(index, q, config, device="cpu")
    np.testing.assert_array_equal(result.positive, cpu[0])
