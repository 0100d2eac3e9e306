"""Peer attribution libraries on the same models, data, losses and queries.

Each peer returns a dense (n_queries, n_train) score matrix in our sign convention (positive =
the training example lowers the query's loss), or raises; the harness reports the exception
text. Peers track the same layers as the project's index.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attribution import Batch, ProjectionConfig
from attribution.config import DEFAULT_K
from attribution.projection import find_layers
from benchmarks.accuracy.settings import Setting

log = logging.getLogger(__name__)


def linearised(model: nn.Module) -> nn.Module:
    """A copy with GPT-2's Conv1D layers replaced by the equal nn.Linear (peers need Linear)."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                lin = nn.Linear(n_in, n_out)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    lin.bias.copy_(child.bias)
                setattr(module, child_name, lin)
    return model.eval()


def _as_batch(setting: Setting, batch) -> Batch:
    if setting.task == "lm":
        n = batch["input_ids"].shape[0]
        return Batch(batch, [str(i) for i in range(n)], mask=batch["attention_mask"])
    x, y = batch
    return Batch((x, y), [str(i) for i in range(len(y))])


def _peer_loss(setting: Setting, model: nn.Module, batch, sample: bool) -> torch.Tensor:
    """The setting's summed training loss; with `sample`, targets drawn from the model's own
    predictions (the true Fisher), from the same forward pass so that hooks see one graph."""
    if setting.task == "lm":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        if sample:
            drawn = torch.distributions.Categorical(logits=logits[:, :-1].detach()).sample()
            targets = torch.where(targets != -100, drawn, targets)
        return nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=-100, reduction="sum",
        )  # fmt: skip
    x, y = batch
    logits = model(x)
    if sample:
        y = torch.distributions.Categorical(logits=logits.detach()).sample()
    return nn.functional.cross_entropy(logits, y, reduction="sum")


def kronfluence_scores(
    setting: Setting, workdir: Path, strategy: str = "ekfac", modules: tuple[str, ...] = ()
) -> np.ndarray:
    """Pairwise influence scores of kronfluence (`strategy` ekfac or kfac), library defaults:
    the true Fisher with sampled targets for the factors and the eigenvalue correction, and
    its default damping (an absolute 1e-8, i.e. practically none). Tracks the layers our
    defaults track, or those matching `modules`."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    base = setting.base_model()
    names = list(find_layers(base, ProjectionConfig(modules=modules)))
    model = linearised(base) if setting.task == "lm" else copy.deepcopy(base).eval()

    class SettingTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return _peer_loss(setting, model, batch, sample)

        def compute_measurement(self, batch, model):
            return setting.query_loss(model, _as_batch(setting, batch)).sum()

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"] if setting.task == "lm" else None

    task = SettingTask()
    model = prepare_model(model, task)
    out = Path(workdir) / setting.name / f"kronfluence-{strategy}{'-modules' if modules else ''}"
    shutil.rmtree(out, ignore_errors=True)
    analyzer = Analyzer(
        analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True,
        output_dir=str(out), log_level=logging.WARNING,
    )  # fmt: skip
    loader = DataLoaderKwargs(collate_fn=setting.collate) if setting.collate else None
    analyzer.fit_all_factors(
        factors_name=strategy,
        dataset=setting.peer_train,
        per_device_batch_size=32,
        dataloader_kwargs=loader,
        factor_args=FactorArguments(strategy=strategy),
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        scores_name=f"{strategy}-scores",
        factors_name=strategy,
        query_dataset=setting.peer_queries,
        train_dataset=setting.peer_train,
        per_device_query_batch_size=len(setting.peer_queries),
        per_device_train_batch_size=64,
        dataloader_kwargs=loader,
        score_args=ScoreArguments(),
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores(f"{strategy}-scores")["all_modules"]
    return scores.double().numpy()


def logix_scores(setting: Setting, workdir: Path, rank: int = DEFAULT_K) -> np.ndarray:
    """LogIX (the reference LoGra implementation): log projected gradients with its KFAC-based
    PCA initialisation, then influence of the queries on every training example."""
    base = setting.base_model()
    names = list(find_layers(base, ProjectionConfig()))
    model = linearised(base) if setting.task == "lm" else copy.deepcopy(base).eval()
    out = Path(workdir) / setting.name / f"logix-rank{rank}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(out)  # LogIX writes its logs under the working directory
    try:
        return _logix_in_cwd(setting, model, names, rank)
    finally:
        os.chdir(cwd)


def _logix_in_cwd(setting: Setting, model: nn.Module, names: list[str], rank: int) -> np.ndarray:
    import logix
    from logix.config import LoRAConfig

    logix._LOGIX_INSTANCE = None  # one run per setting in this process
    run = logix.init(project="bench", config=None)
    logix.watch(model, name_filter=names)
    loader = torch.utils.data.DataLoader(
        setting.peer_train, batch_size=32, shuffle=False, collate_fn=setting.collate
    )

    def loss_of(batch) -> torch.Tensor:
        return setting.train_loss(model, _as_batch(setting, batch)).sum()

    # First pass: KFAC statistics; second: projected gradients with PCA init (LoGra).
    logix.setup({"forward": ["covariance"], "backward": ["covariance"]})
    for i, batch in enumerate(loader):
        with run(data_id=[str(j) for j in range(i * 32, i * 32 + _size(batch))]):
            model.zero_grad()
            loss_of(batch).backward()
    logix.finalize()
    logix.add_lora(lora_config=LoRAConfig(init="pca", rank=rank))
    logix.setup({"grad": ["log", "covariance"]})
    run.save(True)
    for i, batch in enumerate(loader):
        with run(data_id=[str(j) for j in range(i * 32, i * 32 + _size(batch))]):
            model.zero_grad()
            loss_of(batch).backward()
    logix.finalize()
    log_loader = logix.build_log_dataloader()
    logix.eval()
    qloader = torch.utils.data.DataLoader(
        setting.peer_queries, batch_size=len(setting.peer_queries), collate_fn=setting.collate
    )
    batch = next(iter(qloader))
    logix.setup({"grad": ["log"]})
    with run(data_id=[f"q{j}" for j in range(_size(batch))]):
        model.zero_grad()
        setting.query_loss(model, _as_batch(setting, batch)).sum().backward()
    test_log = run.get_log()
    result = run.influence.compute_influence_all(test_log, log_loader)
    scores = torch.as_tensor(result["influence"]).double().numpy()
    order = np.argsort([int(i) for i in result["tgt_ids"]])
    return scores[:, order]


def _size(batch) -> int:
    return batch["input_ids"].shape[0] if isinstance(batch, dict) else len(batch[1])


PEERS = {
    "kronfluence-ekfac": lambda s, w: kronfluence_scores(s, w, "ekfac"),
    "kronfluence-kfac": lambda s, w: kronfluence_scores(s, w, "kfac"),
    # LoRA rank = our k: the same k_in × k_out stored per layer; and LogIX's smaller rank 16.
    f"logix-logra-rank{DEFAULT_K}": lambda s, w: logix_scores(s, w, DEFAULT_K),
    "logix-logra-rank16": lambda s, w: logix_scores(s, w, 16),
}


def run_peer(name: str, setting: Setting, workdir: Path) -> tuple[np.ndarray | None, dict]:
    """(scores or None, status: ok / error with the exception text, seconds)."""
    start = time.perf_counter()
    # Peers draw Fisher labels (and LogIX its projections) from the global generators: seed them
    # so that a rerun reproduces every peer's numbers.
    torch.manual_seed(0)
    np.random.seed(0)
    try:
        scores = PEERS[name](setting, workdir)
        if scores.shape != (setting.n_queries, setting.n_train):
            raise ValueError(f"scores of shape {scores.shape}, expected "
                             f"{(setting.n_queries, setting.n_train)}")  # fmt: skip
        status = {"status": "ok"}
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result, reported verbatim
        log.exception("peer %s failed on %s", name, setting.name)
        scores, status = None, {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    status["seconds"] = round(time.perf_counter() - start, 2)
    return scores, status
