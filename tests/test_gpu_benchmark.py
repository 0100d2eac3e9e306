"""`python -m benchmarks.gpu` on a machine without a GPU: a clear message and exit status 2."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu


def test_without_a_gpu_the_benchmark_says_so_and_exits_2(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        gpu.main([])
    assert exit_.value.code == 2
    assert "torch sees no CUDA GPU here" in capsys.readouterr().err

