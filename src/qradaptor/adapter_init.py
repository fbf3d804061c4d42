"""Quantization-aware adapter starts: LoRA factors chosen so that, at step 0, quantized weight + adapter is close
to the full-precision weight, instead of PEFT's B = 0 (which leaves the whole quantization error for the
fine-tune to undo).

For a linear with full-precision weight ``W`` and quantized weight ``Q`` (the codes the backend stores: they do
not change), the error is ``E = W - Q``; a rank-``r`` adapter adds ``scaling · B A``. The starts:

- ``zero``: PEFT's own (``A`` random, ``B = 0``); the adapter starts at nothing.
- ``svd``: ``B A`` = the best rank-``r`` approximation of ``E`` in weight space (LoftQ with one iteration).
- ``activation``: ``B A`` minimises the error on the layer's *inputs*, ``E_x ||(E - B A) x||²``, with ``x`` the
  inputs the full-precision model gives that linear on calibration tokens (CLoQ / QERA-style). With
  ``H = E[x xᵀ] = L Lᵀ`` (damped), the optimum is ``B A = SVD_r(E L) L⁻¹``: directions the inputs rarely use
  cost nothing, directions they use a lot (LLMs' few large activation channels) are fixed first.
- ``balanced``: the same ``B A`` as ``activation``, factored differently: each row of ``A`` rescaled so that
  ``A x`` is as large as PEFT's random ``A`` makes it (Kaiming-uniform, variance ``1 / (3 · in)``), its column of
  ``B`` by the inverse. Adam moves each weight by about the learning rate, so a step of ``B`` moves the output in
  proportion to ``A x``: the even split makes ``A x`` 1.7–5.4× PEFT's on SmolLM2 (results/learning_rate.md), a
  higher effective rate; this start keeps step 0's fit at the zero start's rate for ``B``. Measured at lr 3e-3
  (benchmarks/results/ablation-lr0.003.md) it ends no better than the even split: kept as a setting to compare.
- ``loftq`` (library and benchmark only: it changes the stored codes): LoftQ's alternation,
  ``Q ← quant(W - B A)``, ``B A ← SVD_r(W - Q)``, a few times.

benchmarks/adapter_init.py compares them (step-0 loss and KL, and after a fine-tune); the training setting
(``--adapter-init``) offers ``zero``, ``svd``, ``activation`` and ``balanced``, the ones that keep the stored codes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .architecture import backbone, decoder_layers, layer_linears, linear_names
from .backends import QuantBackend, QuantCache
from .plan import UNQUANTIZED_BITS, Plan
from .rundir import ADAPTER_INITS as INIT_METHODS  # what `--adapter-init` takes; ``loftq`` (it rewrites the codes)
#                                                   is `loftq_start`, for the benchmark
from .rundir import CALIBRATED_INITS as CALIBRATED  # the starts fitted on calibration tokens' inputs
from .rundir import DEFAULT_START_TOKENS  # calibration tokens for those by default (`--start-tokens`)
#: added to the input second moment, relative to its mean diagonal (as GPTQ damps its Hessian)
DAMPING = 0.01


@dataclass
class Factors:
    """``delta ≈ B @ A`` (fp32) for one linear: ``A`` (rank × in), ``B`` (out × rank), leading directions first,
    so the best rank-``r`` start is the first ``r`` rows of ``A`` and columns of ``B``."""

    A: torch.Tensor
    B: torch.Tensor
    #: ``A`` is already at the scale an adapter holds it (`balanced`): `apply_start` gives ``B`` all of PEFT's
    #: scaling instead of splitting it between the two
    peft_scale: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def truncated(self, rank: int) -> "Factors":
        return Factors(self.A[:rank], self.B[:, :rank], self.peft_scale)


def input_root(gram: torch.Tensor) -> torch.Tensor:
    """``L`` with ``L Lᵀ`` = ``gram`` (the inputs' second moment) damped as `DAMPING` says: the whitening that turns
    ``E_x ||M x||²`` into ``||M L||²_F``. One per input serves every linear reading it and every width fitted."""
    gram = gram.float()
    damped = gram + DAMPING * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                                   device=gram.device)
    return torch.linalg.cholesky(damped)


def low_rank_fit(error: torch.Tensor, rank: int, gram: torch.Tensor | None = None, *,
                 root: torch.Tensor | None = None) -> Factors:
    """The rank-``rank`` ``B A`` closest to ``error`` (out × in): in Frobenius norm, or with ``gram`` (the inputs'
    second moment, in × in) in the norm ``E_x ||(error - B A) x||²``; ``root``, `input_root` of that ``gram``, may
    be given instead (computed once for the linears that share an input). The singular values are split evenly
    between ``A`` and ``B`` (as LoftQ does), so neither factor starts tiny."""
    error = error.float()
    rank = min(rank, *error.shape)
    if gram is None and root is None:
        U, S, Vh = torch.linalg.svd(error, full_matrices=False)
        half = S[:rank].sqrt()  # √S to each factor
        return Factors(half[:, None] * Vh[:rank], U[:, :rank] * half)
    L = input_root(gram) if root is None else root  # damped gram = L Lᵀ, so E_x ||M x||² = ||M L||²_F
    U, S, Vh = torch.linalg.svd(error @ L, full_matrices=False)
    half = S[:rank].sqrt()
    # A = (√S Vhᵣ) L⁻¹, i.e. Lᵀ Aᵀ = (√S Vhᵣ)ᵀ
    A = torch.linalg.solve_triangular(L.T, (half[:, None] * Vh[:rank]).T, upper=True).T
    return Factors(A.contiguous(), U[:, :rank] * half)


def balanced(fit: Factors, gram: torch.Tensor | None = None) -> Factors:
    """``fit`` with each row of ``A`` rescaled so that ``E (a x)²`` is what PEFT's Kaiming-uniform ``A`` gives
    (``trace(gram) / (3 · in)``; ``gram`` the inputs' second moment, the identity when None: row norms), and each
    column of ``B`` by the inverse: the same ``B A``, ``A`` at the scale an adapter holds it."""
    A, B = fit.A.float(), fit.B.float()
    if gram is None:
        energy, total = (A * A).sum(1), float(A.shape[1])
    else:
        gram = gram.float()
        energy, total = ((A @ gram) * A).sum(1), gram.diagonal().sum()
    target = total / (3 * A.shape[1])
    scale = (target / energy.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
    return Factors((A * scale[:, None]).contiguous(), (B / scale).contiguous(), peft_scale=True)


def adapted_linears(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Linear, int, int, int]]:
    """``(full name, linear, bits, rank, group size)`` of every linear of ``model`` (unquantized) that ``plan``
    quantizes and gives an adapter: the ones a start has something to fit for (a 16-bit layer's adapters start at
    zero)."""
    layers = decoder_layers(model)
    targets = set(plan.targets_in(linear_names(layers[0][1])))
    found = []
    for index, ((layer_name, layer), choice) in enumerate(zip(layers, plan.layers)):
        for name, linear in layer_linears(layer):
            own = choice.of(name)
            if own.bits != UNQUANTIZED_BITS and name.rsplit(".", 1)[-1] in targets:
                found.append((f"{layer_name}.{name}", linear, own.bits, own.rank, plan.group_size_of(index, name)))
    return found


def calibration_subset(blocks, tokens: int = DEFAULT_START_TOKENS):
    """The first whole blocks holding at least ``tokens`` tokens (all of them when there are fewer)."""
    return blocks.subset(max(1, -(-tokens // blocks.seq_len)))


class _AllFitted(Exception):
    """Raised by the calibration forward's last fit: nothing after it needs the forward."""


class AdapterStart:
    """Quantization-aware starts for the adapters of ``model`` (full precision; it is not changed), fitted once per
    ``(module, bits, group size)`` up to ``max_rank`` and kept, so the many plans of a search share them.

    ``blocks``: the calibration token blocks (``activation`` only). Every block goes through the model in one
    forward, so each linear sees all of its calibration inputs at once and its fit is made there and then: no
    second moment is kept beyond one linear's (the memory of a forward on those tokens, not of the model's
    linears). ``cache``: the quantized layers, shared with the caller so that the codes fitted against are the
    ones it stores (and nothing is quantized twice).
    """

    def __init__(self, model: nn.Module, method: str, cache: QuantCache, *, blocks=None, max_rank: int = 64):
        if method not in INIT_METHODS:
            raise ValueError(f"unknown adapter start {method!r}; choose one of {list(INIT_METHODS)}")
        if method in CALIBRATED and blocks is None:
            raise ValueError(f"the {method} start needs calibration blocks")
        self.model, self.method, self.cache, self.blocks, self.max_rank = model, method, cache, blocks, max_rank
        self._fits: dict[tuple[str, int, int], Factors] = {}

    def factors(self, plan: Plan) -> dict[str, Factors]:
        """Full module name → the start of its adapter at the plan's rank (modules that start at zero are left
        out: 16-bit layers, and every module with the ``zero`` start)."""
        if self.method == "zero":
            return {}
        self._check_rank(plan)
        wanted = adapted_linears(self.model, plan)
        self._fit_missing(wanted)
        return {name: self._fits[(name, bits, group)].truncated(rank) for name, _, bits, rank, group in wanted}

    def prefit(self, plans) -> int:
        """Fit now, in one calibration forward, every start ``plans`` will ask for that is not fitted yet (a search's
        first plans: fitted one plan at a time, each new bit-width would run a forward of its own). The fits are
        exactly those `factors` would make. Returns how many were fitted."""
        if self.method == "zero":
            return 0
        wanted = []
        for plan in plans:
            self._check_rank(plan)
            wanted += adapted_linears(self.model, plan)
        return self._fit_missing(wanted)

    def _check_rank(self, plan: Plan) -> None:
        if plan.max_rank > self.max_rank:
            raise ValueError(f"plan rank {plan.max_rank} is above the largest rank fitted ({self.max_rank})")

    def _fit_missing(self, wanted) -> int:
        """Fit the starts of the ``(name, linear, bits, rank, group)`` in ``wanted`` not fitted yet."""
        missing = {(name, bits, group): linear for name, linear, bits, _, group in wanted
                   if (name, bits, group) not in self._fits}
        if missing:
            self._fit(missing)
        return len(missing)

    def _error(self, name: str, linear: nn.Linear, bits: int, group_size: int) -> torch.Tensor:
        quantized = self.cache.get(name, linear, bits, group_size)  # where a search's plans were quantized (a GPU)
        return linear.weight.detach().float() - quantized.dequantize().float().to(linear.weight.device)

    def _fit(self, missing: dict[tuple[str, int, int], nn.Linear]) -> None:
        """Fit the start of each ``(full name, bits, group size)`` in ``missing`` (→ its linear); a linear wanted at
        several widths is fitted at each from the same inputs."""
        if self.method == "svd":
            for (name, bits, group), linear in missing.items():
                self._fits[(name, bits, group)] = low_rank_fit(self._error(name, linear, bits, group), self.max_rank)
            return
        by_module: dict[int, list[tuple[str, int, int]]] = {}
        for key, linear in missing.items():
            by_module.setdefault(id(linear), []).append(key)
        # the last input seen, its second moment and that moment's root: q, k and v share theirs (gate and up too)
        last: list = [None, None, None]

        def hook(module, args):
            x = args[0].detach()
            if last[0] is not x:
                flat = x.reshape(-1, x.shape[-1]).float()
                gram = flat.T @ flat / flat.shape[0]
                last[:] = [x, gram, input_root(gram)]
            for name, bits, group in by_module[id(module)]:
                fit = low_rank_fit(self._error(name, module, bits, group), self.max_rank, root=last[2])
                self._fits[(name, bits, group)] = balanced(fit, last[1]) if self.method == "balanced" else fit
            left.discard(id(module))
            if not left:  # the rest of the forward fits nothing (a width met in early layers only: stop there)
                raise _AllFitted

        linears = {id(linear): linear for linear in missing.values()}
        left = set(linears)
        handles = [linear.register_forward_pre_hook(hook) for linear in linears.values()]
        try:
            with torch.no_grad():
                ids = self.blocks.input_ids.to(next(self.model.parameters()).device)
                backbone(self.model)(input_ids=ids, use_cache=False)
        except _AllFitted:
            pass
        finally:
            for handle in handles:
                handle.remove()
            last.clear()
        unseen = [name for name, bits, group in missing if (name, bits, group) not in self._fits]
        if unseen:
            raise RuntimeError(f"the calibration forward never reached {unseen[:3]} ({len(unseen)} linears); the "
                               "activation start needs every adapted linear on the decoder's path")


def apply_start(peft_model: nn.Module, factors: dict[str, Factors]) -> int:
    """Set each adapter named in ``factors`` so that its update ``scaling · B A`` equals the fitted start (PEFT's
    per-module scaling divided out of both factors evenly, or out of ``B`` alone where ``A`` is at the adapter's
    scale already: `balanced`). Returns how many were set."""
    if not factors:
        return 0
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    names = {id(m): n for n, m in base.named_modules()}
    done = 0
    with torch.no_grad():
        for module in base.modules():
            if not isinstance(module, LoraLayer):
                continue
            fit = factors.get(names[id(module)])
            if fit is None:
                continue
            for adapter in module.active_adapters:
                root = float(module.scaling[adapter]) ** 0.5
                A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                if A.shape[0] != fit.rank:
                    raise ValueError(f"{names[id(module)]}: adapter rank {A.shape[0]}, start fitted at {fit.rank}")
                a_div, b_div = (1.0, root * root) if fit.peft_scale else (root, root)
                A.copy_((fit.A / a_div).to(A.device, A.dtype))
                B.copy_((fit.B / b_div).to(B.device, B.dtype))
                if module.use_dora.get(adapter):
                    # DoRA's magnitude starts as the row norms of the adapted weight (PEFT took them with B = 0)
                    magnitude = module.lora_magnitude_vector[adapter].weight
                    weight = module.get_base_layer().weight.detach().float() + (fit.B @ fit.A).to(A.device)
                    magnitude.copy_(weight.norm(dim=1).to(magnitude.dtype))
            done += 1
    missing = set(factors) - {names[id(m)] for m in base.modules() if isinstance(m, LoraLayer)}
    if missing:
        raise ValueError(f"no adapter for {sorted(missing)[:3]} ({len(missing)} fitted modules)")
    return done


def loftq_start(model: nn.Module, plan: Plan, backend: QuantBackend, *, iterations: int = 5,
                ) -> dict[str, tuple[nn.Module, Factors]]:
    """LoftQ's alternation for every adapted linear: ``Q ← quant(W - B A)``, ``B A ← SVD_r(W - Q)``; returns the
    quantized module (new codes, same bytes) and the start of each. For the benchmark's comparison: a run using it
    would have to store these codes, not those of ``quant(W)``."""
    out = {}
    for name, linear, bits, rank, group_size in adapted_linears(model, plan):
        W = linear.weight.detach().float()
        residual = torch.zeros_like(W)
        for _ in range(iterations):
            source = copy.deepcopy(linear)
            with torch.no_grad():
                source.weight.copy_((W - residual).to(linear.weight.dtype))
            quantized = backend.quantize(source, bits, group_size)
            fit = low_rank_fit(W - quantized.dequantize().float(), rank)
            residual = fit.B @ fit.A
        out[name] = (quantized, fit)
    return out
