"""Independent computations the attribution core is checked against.

Full per-example weight gradients come from torch.func on each example alone, unpadded, so
they also check that padding is handled; everything after that is plain numpy.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad

from attribution import Batch, LossFn
from attribution.projection import layer_widths
from attribution.scoring import _inverse_sqrt, precondition


def single_examples(batch: Batch) -> list[Batch]:
    """Each example of a batch alone, with its padding removed."""
    out = []
    for j in range(len(batch)):
        if isinstance(batch.inputs, dict):
            n = int(batch.mask[j].sum()) if batch.mask is not None else None
            inputs = {k: v[j : j + 1, :n] for k, v in batch.inputs.items()}
            mask = batch.mask[j : j + 1, :n] if batch.mask is not None else None
        else:
            inputs = tuple(t[j : j + 1] for t in batch.inputs)
            mask = None
        out.append(Batch(inputs, [batch.example_ids[j]], mask=mask))
    return out


def full_gradients(
    model: nn.Module, loss_fn: LossFn, batches: list[Batch], layer_names: list[str]
) -> dict[str, np.ndarray]:
    """Per layer, the (N, n_out, n_in) full weight gradients of every example.

    An output head tied to the input embedding gets a weight of its own (an equal copy), so
    its gradient is that of its use as the head, apart from the embedding lookup's part.
    """
    model = _untied(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    modules = dict(model.named_modules())

    def loss_of(p: dict, example: Batch) -> torch.Tensor:
        return loss_fn(_Proxy(model, p), example).sum()

    result: dict[str, list[np.ndarray]] = {n: [] for n in layer_names}
    for batch in batches:
        for example in single_examples(batch):
            grads = grad(loss_of)(params, example)
            for name in layer_names:
                g = grads[f"{name}.weight"]
                if isinstance(modules[name], nn.Linear):
                    result[name].append(g.numpy())
                elif isinstance(modules[name], nn.Conv2d):  # (C_out, C_in, kh, kw)
                    result[name].append(g.reshape(g.shape[0], -1).numpy())
                else:  # Conv1D keeps its weight as (n_in, n_out)
                    result[name].append(g.T.numpy())
    for name in layer_names:
        assert layer_widths(modules[name]) is not None
    return {n: np.stack(v) for n, v in result.items()}


def _untied(model: nn.Module) -> nn.Module:
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if not (callable(get_out) and callable(get_in)) or get_out() is None:
        return model
    if get_out().weight is not get_in().weight:
        return model
    model = copy.deepcopy(model)
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())
    assert head.weight is not model.get_input_embeddings().weight
    return model


class _Proxy(nn.Module):
    """Calls the model with the given parameters (torch.func functional call)."""

    def __init__(self, model: nn.Module, params: dict) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_params", params)

    def __call__(self, *args, **kwargs):
        return functional_call(self._model, self._params, args, kwargs)


def project(full: dict[str, np.ndarray], projectors) -> np.ndarray:
    """Full gradients projected afterwards by P_out ⊗ P_in, concatenated: (N, D)."""
    parts = []
    for p in projectors:
        g = full[p.name]
        p_out, p_in = p.p_out.double().numpy(), p.p_in.double().numpy()
        parts.append(np.einsum("ab,nbc,dc->nad", p_out, g, p_in).reshape(g.shape[0], -1))
    return np.concatenate(parts, axis=1)


def damped_fisher_scores(
    train: np.ndarray, queries: np.ndarray, slices, damping_factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Explicit block-diagonal damped Fisher: (scores (Q, N), self-influence (N,)).

    F_l = mean g gᵀ, λ_l = factor × trace(F_l)/d_l, solved directly (no eigendecomposition).
    """
    scores = np.zeros((queries.shape[0], train.shape[0]))
    self_inf = np.zeros(train.shape[0])
    for s in slices:
        g = train[:, s.start : s.stop]
        q = queries[:, s.start : s.stop]
        fisher = g.T @ g / g.shape[0]
        lam = damping_factor * np.trace(fisher) / fisher.shape[0]
        damped = fisher + lam * np.eye(fisher.shape[0])
        scores += q @ np.linalg.solve(damped, g.T)
        self_inf += np.einsum("nd,dn->n", g, np.linalg.solve(damped, g.T))
    return scores, self_inf


def kfac_factors_reference(
    model: nn.Module, loss_fn: LossFn, batches: list[Batch], layer_names: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer, the raw token-level KFAC factors (A = Σ_t x_t x_tᵀ, S = Σ_t δ_t δ_tᵀ).

    Each example runs alone and unpadded; inputs come from forward hooks and output gradients
    from `torch.autograd.grad` of its loss with respect to the layer's outputs.
    """
    modules = dict(model.named_modules())
    a = {n: 0.0 for n in layer_names}
    s = {n: 0.0 for n in layer_names}
    for batch in batches:
        for example in single_examples(batch):
            seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            handles = [
                modules[n].register_forward_hook(
                    lambda mod, args, out, n=n, seen=seen: seen.__setitem__(n, (args[0], out))
                )
                for n in layer_names
            ]
            try:
                loss = loss_fn(model, example).sum()
            finally:
                for h in handles:
                    h.remove()
            outs = torch.autograd.grad(loss, [seen[n][1] for n in layer_names])
            for n, d in zip(layer_names, outs, strict=True):
                x = seen[n][0].detach()
                if isinstance(modules[n], nn.Conv2d):  # one token per output position
                    x = conv2d_patches(modules[n], x)
                    d = d.flatten(2).transpose(1, 2)
                x = x.reshape(-1, x.shape[-1]).double().numpy()
                d = d.reshape(-1, d.shape[-1]).double().numpy()
                a[n] = a[n] + x.T @ x
                s[n] = s[n] + d.T @ d
    return {n: (a[n], s[n]) for n in layer_names}


def conv2d_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H'·W', C·kh·kw): the input patch each output position sees, cut out
    one position at a time from the zero-padded input (row-major positions; each patch ordered
    channel, kernel row, kernel column, as the weight's (C_out, C, kh, kw) layout flattens)."""
    (ph, pw), (sh, sw), (dh, dw) = conv.padding, conv.stride, conv.dilation
    kh, kw = conv.kernel_size
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    rows = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    cols = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    patches = []
    for r in range(rows):
        for c in range(cols):
            window = padded[:, :, r * sh : r * sh + dh * (kh - 1) + 1 : dh,
                            c * sw : c * sw + dw * (kw - 1) + 1 : dw]  # fmt: skip
            patches.append(window.reshape(x.shape[0], -1))
    return torch.stack(patches, dim=1)


def score_scale(index, q: np.ndarray, relatif: bool) -> np.ndarray:
    """(Q, N) magnitude of the terms of each float32 score: Σ_d |(F + λI)⁻¹q|_d·|g_d| (times
    RelatIF's 1/sqrt(self-influence)). Scores cancel, so their rounding follows the terms."""
    g = np.concatenate([np.asarray(a, dtype=np.float64) for _, a in index.blocks()])
    terms = np.abs(precondition(index, q)) @ np.abs(g).T
    return terms * _inverse_sqrt(index.self_influence)[None, :] if relatif else terms


def assert_rows_close(actual: np.ndarray, expected: np.ndarray, index, tokens: int) -> None:
    """Rows of `index`'s layout against rows computed elsewhere (another process, thread count
    or CPU) from a float32 model: each entry sums ≤ `tokens` tokens' products over a layer's
    widths, and the rounding reaches every entry of a layer at that layer's largest |entry|."""
    from tests.tolerance import assert_close_f32

    expected = np.asarray(expected, dtype=np.float64)
    scale = np.zeros(expected.shape[1])
    for layer in index.build["layers"]:
        scale[layer["start"] : layer["stop"]] = np.abs(
            expected[:, layer["start"] : layer["stop"]]
        ).max()
    width = max(max(p.p_in.shape[1], p.p_out.shape[1]) for p in index.projectors())
    assert_close_f32(actual, expected, tokens * width, scale=scale, what="rows")
