"""LoGra projection: Kronecker-structured projectors and the hooks that capture what they need.

For a linear layer y = W x (W: n_out × n_in) the per-example weight gradient is Σ_t δ_t x_tᵀ.
LoGra projects it with P_out ⊗ P_in, which equals Σ_t (P_out δ_t)(P_in x_t)ᵀ: a k_out × k_in
matrix formed from projected activations, without ever building the n_out × n_in gradient.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from attribution.config import ProjectionConfig
from attribution.device import batch_on, compute_dtype, exact_float32, model_device
from attribution.distributed import BlockPlan
from attribution.types import Batch, LossFn


def _is_conv1d(module: nn.Module) -> bool:
    """A `transformers` Conv1D (GPT-2 style, weight kept transposed as n_in × n_out).

    Looked up only if transformers is already imported: a model that has one imported it.
    """
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


@dataclass(frozen=True)
class LayerSpec:
    """A tracked layer: its module name and widths."""

    name: str
    n_in: int
    n_out: int
    head: bool = False
    """The model's output head (see `ProjectionConfig.head_k_out`)."""


def _conv2d_padding(module: nn.Module) -> tuple[int, int] | None:
    """The symmetric zero padding of an ungrouped `nn.Conv2d` as (rows, columns), None for any
    other module and for a convolution whose patches `F.unfold` cannot reproduce (groups,
    non-zero padding modes, "same" padding split unevenly)."""
    if not isinstance(module, nn.Conv2d) or module.groups != 1 or module.padding_mode != "zeros":
        return None
    if module.padding == "valid":
        return 0, 0
    if module.padding == "same":
        span = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        return None if any(s % 2 for s in span) else (span[0] // 2, span[1] // 2)
    return int(module.padding[0]), int(module.padding[1])


def layer_widths(module: nn.Module) -> tuple[int, int] | None:
    """(n_in, n_out) of a Linear, Conv1D or ungrouped Conv2d layer (whose input side is a patch,
    channels × kernel rows × kernel columns), None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    if _conv2d_padding(module) is not None:
        n_out = module.weight.shape[0]
        return int(module.weight[0].numel()), int(n_out)
    return None


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """A tracked layer's weight as the (n_out, n_in) matrix its gradient rows project."""
    if _is_conv1d(module):
        return module.weight.T
    return module.weight.reshape(module.weight.shape[0], -1)


def layer_tokens(module: nn.Module, t: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """A Conv2d layer's input (B, C, H, W) as its patches (B, H'·W', C·kh·kw), or its output
    gradient (B, C_out, H', W') as (B, H'·W', C_out): one token per output position, so that
    Σ_t δ_t x_tᵀ is the weight gradient. Any other layer's tensor is returned as it is."""
    padding = _conv2d_padding(module)
    if padding is None or t.dim() != 4:
        return t
    if grad:
        return t.flatten(2).transpose(1, 2)
    patches = nn.functional.unfold(
        t, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )
    return patches.transpose(1, 2)


def output_head(model: nn.Module) -> tuple[nn.Module | None, bool]:
    """The model's output head (`get_output_embeddings()`, the layer giving the logits) and
    whether its weight is tied to the input embedding; (None, False) for other models."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is None:
        return None, False
    inp = get_in() if callable(get_in) else None
    tied = inp is not None and getattr(out, "weight", None) is getattr(inp, "weight", 0)
    return out, tied


def output_head_name(model: nn.Module, layers: dict[str, nn.Module]) -> str | None:
    """Name of the output head among `layers`, or None when it is not tracked."""
    head, _ = output_head(model)
    return next((name for name, m in layers.items() if m is head), None)


def find_layers(model: nn.Module, config: ProjectionConfig) -> dict[str, nn.Module]:
    """The tracked layers of `model`, by module name, in module order.

    Without module patterns, an output head whose weight is tied to the input embedding is
    tracked only with `config.tied_head`: hooks see the head's use of the shared weight, not
    the embedding lookup's, so the head is then a layer of its own. With module patterns, the
    head is tracked when a pattern matches its name, whatever `tied_head` says (building an
    index warns when `tied_head` is set and none does: `untracked_tied_head`).
    """
    head, tied = output_head(model)
    skip = id(head) if tied and not config.tied_head else None
    layers = {}
    for name, module in model.named_modules():
        if layer_widths(module) is None or not config.tracks(name) or routed_expert(name):
            continue
        if not config.modules and id(module) == skip:
            continue
        layers[name] = module
    if not layers:
        raise ValueError(
            "no Linear, Conv1D or Conv2d layer matches the projection's module patterns "
            f"{list(config.modules) or '(all)'}"
        )
    return layers


def routed_expert(name: str) -> bool:
    """A layer of a mixture's routed experts (`...mlp.experts.3.w1`, Hugging Face's naming):
    it sees only the tokens routed to it, gathered from the whole batch, so its per-example
    gradients cannot be taken from its inputs and output gradients; never tracked."""
    return "experts" in name.split(".")


MIN_TRACKED_SHARE = 0.5
"""Below this share of the model's parameters (embeddings aside) in tracked layers, an index
is refused without module patterns (a warning with them): scores would rest on a small part of
the model (the routed experts of a mixture, or layers other than Linear / Conv1D / Conv2d)."""


def tracked_share(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[float, int, str]:
    """(share, parameters, where): the share of the model's parameters held by the tracked
    layers' weights, of all its parameters but those of input embeddings not tracked as a
    tied head; `where` names the kinds of module holding most of the untracked ones."""
    tracked = {id(m.weight) for m in layers.values()}
    counted: dict[int, int] = {}
    untracked_by_kind: dict[str, int] = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in counted:
                continue
            if isinstance(module, nn.Embedding) and id(p) not in tracked:
                counted[id(p)] = 0
                continue
            counted[id(p)] = p.numel()
            if id(p) not in tracked:
                kind = type(module).__name__
                untracked_by_kind[kind] = untracked_by_kind.get(kind, 0) + p.numel()
    total = sum(counted.values())
    share = sum(counted[i] for i in tracked if i in counted) / total if total else 1.0
    kinds = sorted(untracked_by_kind.items(), key=lambda kv: -kv[1])[:2]
    where = ", ".join(f"{k} {n / total:.0%}" for k, n in kinds) if total else ""
    return share, total, where


def check_tracked_share(model: nn.Module, layers: dict[str, nn.Module], config: ProjectionConfig):
    """Refuse (without module patterns) or warn (with them) when the tracked layers hold less
    than `MIN_TRACKED_SHARE` of the model's parameters (`tracked_share`), in one line."""
    share, total, where = tracked_share(model, layers)
    if share >= MIN_TRACKED_SHARE:
        return
    message = (
        f"the tracked layers hold {share:.0%} of the model's {total:,} parameters outside its "
        f"embeddings (untracked: {where}); only Linear, Conv1D and Conv2d layers that see every token "
        "are tracked, not a mixture's routed experts, so scores would rest on a small part of "
        "the model"
    )
    if not config.modules:
        raise ValueError(message)
    logging.getLogger(__name__).warning("%s (module patterns %s)", message, list(config.modules))


def untracked_tied_head(model: nn.Module, config: ProjectionConfig) -> str | None:
    """The name of an output head tied to the input embedding that module patterns leave out
    although `config.tied_head` asks for it (None when there is none, or it is tracked)."""
    if not config.modules or not config.tied_head:
        return None
    head, tied = output_head(model)
    if not tied:
        return None
    name = next((n for n, m in model.named_modules() if m is head), None)
    return name if name is not None and not config.tracks(name) else None


def layer_specs(layers: dict[str, nn.Module], head: str | None = None) -> list[LayerSpec]:
    """Name and widths of each tracked layer; `head` names the output head among them."""
    specs = []
    for name, module in layers.items():
        n_in, n_out = layer_widths(module)  # type: ignore[misc]
        specs.append(LayerSpec(name, n_in, n_out, name == head))
    return specs


@dataclass
class LayerProjector:
    """P_in (k_in × n_in) and P_out (k_out × n_out) of one layer."""

    name: str
    p_in: torch.Tensor
    p_out: torch.Tensor

    @property
    def dim(self) -> int:
        return self.p_in.shape[0] * self.p_out.shape[0]

    def project_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_in) → (..., k_in), in float32 at least (a bfloat16 model's activations are
        projected in float32), on x's device."""
        return _project(x, self.p_in)

    def project_output_grads(self, d: torch.Tensor) -> torch.Tensor:
        """(..., n_out) → (..., k_out), in float32 at least, on d's device."""
        return _project(d, self.p_out)

    def to(self, device: torch.device) -> LayerProjector:
        """The same projector with P_in and P_out on `device`."""
        return LayerProjector(self.name, self.p_in.to(device), self.p_out.to(device))


def _project(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """t @ pᵀ in t's precision, at least float32; p moved to t's device if it is elsewhere."""
    dtype = compute_dtype(t.dtype)
    return t.to(dtype) @ p.to(device=t.device, dtype=dtype).T


def _layer_seed(seed: int, name: str) -> int:
    """A seed derived from the global seed and the module name only (never a rank)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_projectors(specs: list[LayerSpec], config: ProjectionConfig) -> list[LayerProjector]:
    """Seeded random projectors: k orthonormal rows, from a Gaussian draw, scaled by
    sqrt(n/k) so that E‖Pg‖² = ‖g‖². Seeded by the global seed and the layer's name, so a
    seed gives the same rows on any machine (up to the last bit of the orthonormalisation).

    Orthonormal rather than plain Gaussian rows: the damping λ·I on the projected side is
    λ·(PᵀP)⁺ on the gradient's, which orthonormal rows keep isotropic on the kept subspace;
    a k × n Gaussian's squared singular values spread over (1 ± sqrt(k/n))², which for k
    near n leaves some directions almost undamped. A side whose k reaches its width keeps
    the identity: nothing is left to compress.
    """
    projectors = []
    for spec in specs:
        k_in, k_out = config.dims_for(spec.name, spec.n_in, spec.n_out, spec.head)
        gen = torch.Generator(device="cpu").manual_seed(_layer_seed(config.seed, spec.name))
        p_in = random_rows(k_in, spec.n_in, gen)
        p_out = random_rows(k_out, spec.n_out, gen)
        projectors.append(LayerProjector(spec.name, p_in.float(), p_out.float()))
    return projectors


def random_rows(k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(k, n) float64: the row space of a seeded k × n Gaussian, orthonormalised and scaled by
    sqrt(n/k); the identity when k ≥ n (the generator advances as for the draw either way)."""
    draw = torch.randn(k, n, generator=gen, dtype=torch.float64)
    if k >= n:
        return torch.eye(n, dtype=torch.float64)
    q, r = torch.linalg.qr(draw.T)  # (n, k): orthonormal columns spanning the draw's rows
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    q = q * signs  # the unique Q with a non-negative diagonal of R
    return q.T * (n / k) ** 0.5


def identity_projectors(specs: list[LayerSpec]) -> list[LayerProjector]:
    """P = I: the projected gradient is the full gradient (for tests and tiny models)."""
    return [
        LayerProjector(
            s.name, torch.eye(s.n_in, dtype=torch.float64), torch.eye(s.n_out, dtype=torch.float64)
        )
        for s in specs
    ]


def _flatten_tokens(
    t: torch.Tensor, name: str, batch_size: int, tokens: int | None
) -> torch.Tensor:
    """A layer's input or output gradient as (B, T, n): tokens of one example along dim 1.

    (B, n) → (B, 1, n); (B, ..., n) → (B, T', n). A 2-d (B·T, n) tensor, from a model that
    flattens its batch before the layer (OPT's MLP), is split back batch-major when T is the
    batch's padded length. Any other leading size (tokens routed to mixture-of-experts layers,
    sequence-first layouts) cannot be split per example and is refused.
    """
    if t.shape[0] == batch_size:
        return t.unsqueeze(1) if t.dim() == 2 else t.reshape(batch_size, -1, t.shape[-1])
    if t.dim() == 2 and tokens is not None and t.shape[0] == batch_size * tokens:
        return t.reshape(batch_size, tokens, t.shape[-1])
    raise ValueError(
        f"layer '{name}' sees a tensor of shape {tuple(t.shape)} that does not split into the "
        f"batch's {batch_size} examples; per-example gradients cannot be taken there (exclude "
        "it with the projection's module patterns)"
    )


class Capture:
    """Hooks on tracked layers that keep transformed inputs and output gradients.

    `transform_in(name, x)` and `transform_out(name, d)` map the raw (B, T, n) tensors to what is
    kept (projected, or raw for covariance statistics). A layer called several times in one
    forward pass contributes each call as further tokens.
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        transform_in: Callable[[str, torch.Tensor], torch.Tensor],
        transform_out: Callable[[str, torch.Tensor], torch.Tensor],
        batch: Batch,
    ) -> None:
        self.layers = layers
        self.batch_size = len(batch)
        mask = batch.mask
        self.tokens = int(mask.shape[1]) if mask is not None and mask.dim() == 2 else None
        self.transform_in = transform_in
        self.transform_out = transform_out
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.grads: dict[str, list[torch.Tensor | None]] = {}
        self._handles: list = []

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = self._split(name, layer_tokens(module, args[0].detach()))
            self.inputs.setdefault(name, []).append(self.transform_in(name, x))
            slots = self.grads.setdefault(name, [])
            slots.append(None)
            slot = len(slots) - 1
            if not output.requires_grad:
                # Parameters need no grad while logging; the graph starts at this output.
                output = output.detach().requires_grad_(True)

            def grad_hook(g: torch.Tensor) -> None:
                g = layer_tokens(module, g.detach(), grad=True)
                slots[slot] = self.transform_out(name, self._split(name, g))

            output.register_hook(grad_hook)
            return output

        return hook

    def _split(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return _flatten_tokens(t, name, self.batch_size, self.tokens)

    def __enter__(self) -> Capture:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.inputs.clear()
        self.grads.clear()

    def pairs(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, grads) of a layer after backward, calls concatenated along tokens."""
        ins = self.inputs.get(name)
        outs = self.grads.get(name)
        if not ins or outs is None or any(g is None for g in outs):
            raise RuntimeError(
                f"layer '{name}' received no gradient: the loss does not depend on it "
                "(exclude it with the projection's module patterns)"
            )
        return torch.cat(ins, dim=1), torch.cat(outs, dim=1)  # type: ignore[arg-type]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, then back in its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient while logging: no weight gradient is ever computed."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def token_mask(batch: Batch, x: torch.Tensor) -> torch.Tensor | None:
    """The batch's (B, T) mask as a (B, T, 1) multiplier when it matches the captured tokens."""
    if batch.mask is None:
        return None
    m = batch.mask
    if m.dim() == 2 and m.shape[1] == x.shape[1]:
        return m.to(x.dtype).unsqueeze(-1)
    return None


def backward_per_example(model: nn.Module, loss_fn: LossFn, batch: Batch) -> None:
    """Forward and backward of the summed per-example losses (per-example gradients separate)."""
    losses = loss_fn(model, batch)
    if losses.dim() != 1 or losses.shape[0] != len(batch):
        raise ValueError(
            f"loss_fn must return one loss per example, shape ({len(batch)},), "
            f"got {tuple(losses.shape)}"
        )
    losses.sum().backward()


def projected_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    layers: dict[str, nn.Module],
    projectors: list[LayerProjector],
) -> torch.Tensor:
    """Per-example LoGra gradients of one batch: (B, Σ_l k_out·k_in), layers in order.

    Each layer's block is Σ_t (P_out δ_t)(P_in x_t)ᵀ flattened row-major (k_out, k_in).
    """
    by_name = {p.name: p for p in projectors}
    batch = batch_on(batch, model_device(model))
    raw_out: dict[str, bool] = {}  # per layer, decided at its first call: δ kept unprojected

    def output_grads(name: str, d: torch.Tensor) -> torch.Tensor:
        proj = by_name[name]
        if name not in raw_out:
            k_in, k_out = proj.p_in.shape[0], proj.p_out.shape[0]
            raw_out[name] = contract_first(d.shape[1], d.shape[2], k_in, k_out)
        if raw_out[name]:
            return d.to(compute_dtype(d.dtype))
        return proj.project_output_grads(d)

    capture = Capture(layers, lambda n, x: by_name[n].project_inputs(x), output_grads, batch)
    with exact_float32():
        with frozen_parameters(model), capture, torch.enable_grad():
            backward_per_example(model, loss_fn, batch)
        blocks = []
        for proj in projectors:
            x, d = capture.pairs(proj.name)
            mask = token_mask(batch, x)
            if mask is not None:
                x = x * mask
            g = torch.einsum("bto,bti->boi", d, x)
            if raw_out.get(proj.name):  # P_out (Σ_t δ_t (P_in x_t)ᵀ): the same product
                g = torch.matmul(proj.p_out.to(device=g.device, dtype=g.dtype), g)
            blocks.append(g.reshape(x.shape[0], -1))
        return torch.cat(blocks, dim=1)


def contract_first(tokens: int, n_out: int, k_in: int, k_out: int) -> bool:
    """Whether a layer's projected gradient P_out (Σ_t δ_t x̃_tᵀ) costs fewer multiplications
    contracted over the tokens first (T·n_out·k_in, then n_out·k_out·k_in per example) than
    with every δ_t projected first (T·n_out·k_out, then T·k_out·k_in): a wide output side
    (a language model's vocabulary) kept at many rows, over examples of many tokens."""
    first = tokens * n_out * k_in + n_out * k_out * k_in
    projected = tokens * n_out * k_out + tokens * k_out * k_in
    return first < projected


@contextmanager
def seeded_sampling(seed: int) -> Iterator[None]:
    """Torch's global generators forked and seeded: labels a Fisher loss draws with the default
    generator are the same on every run, and the caller's random state is left as it was."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass
class KfacFactors:
    """A layer's token-level KFAC factors A = Σ_t x_t x_tᵀ and S = Σ_t δ_t δ_tᵀ (float64),
    raw or in the projected space, summed over real tokens of `examples` examples."""

    name: str
    a: torch.Tensor
    s: torch.Tensor
    examples: int

    def projected(self, projector: LayerProjector, s_projected: bool = False) -> KfacFactors:
        """P_in A P_inᵀ and P_out S P_outᵀ of raw factors (S kept when `s_projected`: it was
        accumulated already projected by the same P_out)."""
        p_in = projector.p_in.to(device=self.a.device, dtype=torch.float64)
        p_out = projector.p_out.to(device=self.a.device, dtype=torch.float64)
        s = self.s if s_projected else p_out @ self.s @ p_out.T
        return KfacFactors(self.name, p_in @ self.a @ p_in.T, s, self.examples)


def kfac_factors(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    layers: dict[str, nn.Module],
    projectors: list[LayerProjector] | None = None,
    progress: Callable[[Iterable[Batch]], Iterable[Batch]] = lambda b: b,
    seed: int = 0,
    fixed_out: dict[str, torch.Tensor] | None = None,
    plan: BlockPlan | None = None,
    take: Callable[[int], bool] | None = None,
) -> list[KfacFactors] | None:
    """One pass over `batches`: every tracked layer's KFAC factors.

    With `projectors`, activations and output gradients are projected first and the factors
    are k × k; without, they are the raw n × n factors, except that a layer named in
    `fixed_out` has its output gradients projected by that P_out (k_out × n_out) already, so
    its S is k_out × k_out (the head's vocabulary side). Batch b runs under
    `seeded_sampling(seed + b)`, so a loss that samples its labels is reproducible. Each
    batch's product is taken in the activations' precision (at least float32) and summed in
    float64, on the model's device (float32 products on a GPU, without TF32 unless the caller
    enabled it).

    With `plan` (`attribution.distributed.BlockPlan`) this rank takes only its batches, the
    sums are added in its fixed tree of index blocks and reduced across ranks: the factors
    are returned on the main rank, None on the others.

    `take(n)`, called for every batch in order with its number of examples, says whether the
    batch is used (`attribution.index.CurvatureSample`: a sample spread over the data); the
    factors' `examples` are then the examples used. Batch numbers, and so sampled labels,
    are those of the whole data either way.
    """
    specs = layer_specs(layers)
    by_name = {p.name: p for p in projectors} if projectors is not None else None
    keep = lambda n, t: t  # noqa: E731 - raw tensors
    capture_in = (lambda n, t: by_name[n].project_inputs(t)) if by_name else keep
    fixed = fixed_out or {}
    capture_out = (
        (lambda n, t: by_name[n].project_output_grads(t))
        if by_name
        else (lambda n, t: _project(t, fixed[n]) if n in fixed else t)
    )
    sums: dict[str, list[torch.Tensor | int]] = {s.name: [0, 0] for s in specs}
    count = used = 0
    device = model_device(model)
    for number, batch in enumerate(progress(batches)):
        unit = plan.unit(count) if plan is not None else None
        count += len(batch)
        if take is not None and not take(len(batch)):
            continue  # outside the sample
        used += len(batch)
        if plan is not None and unit is None:
            continue  # another rank's batch
        batch = batch_on(batch, device)
        capture = Capture(layers, capture_in, capture_out, batch)
        with (
            frozen_parameters(model),
            capture,
            torch.enable_grad(),
            seeded_sampling(seed + number),
            exact_float32(),
        ):
            backward_per_example(model, loss_fn, batch)
        for s in specs:
            x, d = capture.pairs(s.name)
            mask = token_mask(batch, x)
            if mask is not None:
                x, d = x * mask, d * mask
            x2 = x.reshape(-1, x.shape[-1])
            d2 = d.reshape(-1, d.shape[-1])
            if x2.dtype not in (torch.float32, torch.float64):
                x2, d2 = x2.float(), d2.float()
            sums[s.name][0] = (x2.T @ x2).double() + sums[s.name][0]
            sums[s.name][1] = (d2.T @ d2).double() + sums[s.name][1]
        if plan is not None:
            plan.add(unit, [t for s in specs for t in sums[s.name]])
            sums = {s.name: [0, 0] for s in specs}
    if used == 0:
        raise ValueError("the KFAC factors need data: the first pass saw no example")
    if plan is not None:
        total = plan.finish(count)
        if total is None:
            return None
        sums = {s.name: total[2 * i : 2 * i + 2] for i, s in enumerate(specs)}
    return [KfacFactors(s.name, sums[s.name][0], sums[s.name][1], used) for s in specs]


def pca_projectors(
    factors: list[KfacFactors],
    specs: list[LayerSpec],
    config: ProjectionConfig,
    fixed_out: dict[str, torch.Tensor] | None = None,
) -> list[LayerProjector]:
    """Projectors from the top eigenvectors of each layer's raw KFAC factors: P_in = top-k_in
    eigenvectors of A_l, P_out = top-k_out eigenvectors of S_l (as rows), or the layer's P_out
    in `fixed_out`."""
    fixed_out = fixed_out or {}
    projectors = []
    for f, s in zip(factors, specs, strict=True):
        k_in, k_out = config.dims_for(s.name, s.n_in, s.n_out, s.head)
        p_in = _top_eigvecs(f.a, k_in, s.name)
        p_out = fixed_out.get(s.name)
        p_out = _top_eigvecs(f.s, k_out, s.name) if p_out is None else p_out.float()
        projectors.append(LayerProjector(s.name, p_in, p_out))
    return projectors


def _top_eigvecs(cov: torch.Tensor, k: int, name: str) -> torch.Tensor:
    """Top-k eigenvectors (rows, float32) of a symmetric PSD matrix, sign-fixed."""
    if not torch.isfinite(cov).all():
        raise ValueError(f"PCA projection of layer '{name}': covariance is not finite")
    vals, vecs = torch.linalg.eigh(cov)
    top = vecs[:, torch.argsort(vals, descending=True)[:k]].T.contiguous()
    # Fix each eigenvector's sign (largest entry positive) so builds are reproducible.
    idx = top.abs().argmax(dim=1)
    signs = torch.sign(top[torch.arange(top.shape[0]), idx])
    signs[signs == 0] = 1
    return (top * signs[:, None]).float()


def checkpoint_prefix(number: int) -> str:
    """The prefix of a model's layer names in an index: '' for the model itself (number 0),
    'checkpoint{number}/' for the number-th further checkpoint."""
    return "" if number == 0 else f"checkpoint{number}/"


@dataclass
class Tracked:
    """One model whose projected gradients make up part of every index row: its tracked
    layers, their projectors (named as the layers), and the prefix of those names in the
    index (`checkpoint_prefix`). An index over several checkpoints of a training run holds,
    per row, each checkpoint's gradient one after the other; its curvature is per layer, so
    a score is the sum over checkpoints of that checkpoint's influence."""

    model: nn.Module
    layers: dict[str, nn.Module]
    projectors: list[LayerProjector]
    prefix: str = ""

    def named(self) -> list[LayerProjector]:
        """The projectors under their names in the index."""
        return [LayerProjector(self.prefix + p.name, p.p_in, p.p_out) for p in self.projectors]

    def on_model_device(self) -> Tracked:
        """The member with its projectors on its model's device (moved once, not per batch)."""
        device = model_device(self.model)
        return Tracked(self.model, self.layers, [p.to(device) for p in self.projectors],
                       self.prefix)  # fmt: skip


@contextmanager
def members_eval_mode(members: list[Tracked]) -> Iterator[None]:
    """Every member's model in eval mode for the block."""
    with ExitStack() as stack:
        for m in members:
            stack.enter_context(eval_mode(m.model))
        yield


def tracked_gradients(
    members: list[Tracked], loss_fn: LossFn, batch: Batch, seed: int | None = None
) -> torch.Tensor:
    """(B, Σ dims) every member's `projected_gradients`, side by side in member order. With
    `seed`, each member's backward pass runs under `seeded_sampling(seed)`: a loss that draws
    labels draws them for each checkpoint as a build of that checkpoint alone would."""
    parts = []
    for m in members:
        with seeded_sampling(seed) if seed is not None else nullcontext():
            parts.append(projected_gradients(m.model, loss_fn, batch, m.layers, m.projectors))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def split_members(
    models: list[nn.Module], config: ProjectionConfig, named: list[LayerProjector], where: str
) -> list[Tracked]:
    """The members of an index from its models (the model, then its further checkpoints in
    order) and its projectors under their index names; a model whose tracked layers are not
    the index's is refused (`where` names the index in the message)."""
    members, start = [], 0
    for number, model in enumerate(models):
        layers = find_layers(model, config)
        prefix = checkpoint_prefix(number)
        mine = named[start : start + len(layers)]
        expected = [p.name for p in mine]
        found = [prefix + n for n in layers]
        if found != expected:
            what = "the model's" if number == 0 else f"checkpoint {number}'s"
            raise ValueError(
                f"{what} layers do not match the index {where}: "
                f"expected {expected[:3]}..., found {found[:3]}..."
            )
        projectors = [LayerProjector(p.name[len(prefix) :], p.p_in, p.p_out) for p in mine]
        members.append(Tracked(model, layers, projectors, prefix).on_model_device())
        start += len(layers)
    if start != len(named):
        raise ValueError(
            f"the index {where} holds {len(named) - start} more layers than the models given: "
            "was it built over further checkpoints (checkpoints=...)?"
        )
    return members
