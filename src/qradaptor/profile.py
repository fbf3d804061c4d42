"""Stage 1: per-layer sensitivity. For every decoder layer ``l`` and bit-width ``b``, quantize only layer
``l`` at ``b`` and measure the mean per-token KL(p_full ‖ p_quant) on calibration text.

Why it is fast: one full-precision pass records the hidden states entering every layer, so the probe for
layer ``l`` runs only layers ``l..L`` (on average half the model); quantized layers come from the backend's
cache; the decoder layers can run in bf16.

The reference distribution is kept exactly in 1 + hidden_size numbers per token instead of a vocabulary's
worth. With logits ``z = W h + b`` (the LM head is linear),

    KL(p ‖ q) = Σ p log p − Σ p_i z_i + logsumexp(z) = −H(p) − (Wᵀp)·h − p·b + logsumexp(W h + b),

so per position the reference needs only its negative entropy and its expected output embedding ``Wᵀp``;
the probe needs its final hidden state ``h`` and one logsumexp. The LM head runs in fp32 in every mode,
since the KL is a small difference of large terms. (Top-k log-probabilities plus the tail's mass would only
give a lower bound of the KL, loose on heavy-tailed next-token distributions.)

Results go to ``OUT/sensitivity.json`` (+ ``sensitivity.png``), are cached on disk keyed by model
fingerprint + data + settings, and a run that is interrupted keeps its finished probes in
``OUT/sensitivity.partial.json``, so rerunning the same command resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .backends import QuantBackend, QuantCache, get_backend
from .data import DEFAULT_DATA, TokenBlocks, data_fingerprint, load_blocks
from .errors import DataError, QRAdaptorError
from .io import atomic_write_json, read_text
from .device import model_device
from .models import cache_dir, model_fingerprint
from .architecture import backbone, decoder_layers, expert_holders, final_norm, layer_linears, linear_names
from .precision import DTYPES
from .quantize import set_child
from .threads import rebalance

log = logging.getLogger("qradaptor")

RESULT_FILE = "sensitivity.json"
PARTIAL_FILE = "sensitivity.partial.json"
HEATMAP_FILE = "sensitivity.png"
FORMAT = "qradaptor-sensitivity-1"


class ProfileError(QRAdaptorError):
    """The profile cannot run as asked (output directory of another model, ...)."""


#: Calibration tokens by default: enough for stable per-layer KL on a small model (DESIGN §2).
DEFAULT_TOKENS = 4096
#: Tokens the per-module estimates run one layer on (`ProfileSettings.modules`).
DEFAULT_MODULE_TOKENS = 1024


@dataclass
class ProfileSettings:
    bits: tuple[int, ...] = (2, 3, 4)  # probed per layer; 8 bits is also measured for the whole model
    # calibration tokens (whole blocks of seq_len); None: DEFAULT_TOKENS, or all the training split has if fewer
    tokens: int | None = None
    seq_len: int = 256
    group_size: int = 64
    backend: str = "hqq"
    dtype: str = "float32"  # decoder layers' compute dtype: "float32" or "bfloat16" (faster; the head stays fp32)
    batch_size: int = 4
    data: str | None = None
    seed: int = 0
    # per-module estimates too (`Sensitivity.module_kl`): each linear's share of its layer's KL, from the layer's
    # output error with that linear alone quantized, on the first ``module_tokens`` calibration tokens
    modules: bool = False
    module_tokens: int = DEFAULT_MODULE_TOKENS

    def __post_init__(self) -> None:
        self.bits = tuple(sorted(set(int(b) for b in self.bits)))
        if not self.bits:
            raise ProfileError("no bit-widths to profile", "pass e.g. --bits 2,3,4")
        if any(not 2 <= b <= 8 for b in self.bits):
            raise ProfileError(f"cannot profile bits {[b for b in self.bits if not 2 <= b <= 8]}: the profile probes "
                               "quantized bit-widths, 2 to 8 (16, unquantized, has no quantization error)",
                               "pass --bits from 2..8, e.g. --bits 2,3,4")
        if self.dtype not in DTYPES:
            raise ProfileError(f"unknown dtype {self.dtype!r}", f"use {' or '.join(DTYPES)}")
        for name in ("seq_len", "group_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ProfileError(f"{name} must be at least 1, got {getattr(self, name)}",
                                   f"pass a positive --{name.replace('_', '-')} (default {getattr(ProfileSettings, name)})")
        if self.modules and self.module_tokens < 1:
            raise ProfileError(f"module_tokens must be at least 1, got {self.module_tokens}",
                               f"the default is {DEFAULT_MODULE_TOKENS}")
        if self.tokens is not None and self.tokens < self.seq_len:
            raise ProfileError(f"--tokens {self.tokens} is less than one block of {self.seq_len} tokens",
                               f"use at least {self.seq_len} calibration tokens (a few thousand is better)")

    @property
    def num_blocks(self) -> int:
        return (DEFAULT_TOKENS if self.tokens is None else self.tokens) // self.seq_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"] = list(self.bits)
        d["data"] = self.data or DEFAULT_DATA
        if not self.modules:  # written only when on: the keys of per-layer profiles (and their caches) stay as before
            del d["modules"], d["module_tokens"]
        return d


@dataclass
class Sensitivity:
    """The profile: ``kl[layer][bits]`` and ``weight_error[layer][bits]`` (bits as ints in memory,
    strings in JSON); with ``ProfileSettings.modules``, ``module_kl[layer][name][bits]``: the estimated KL of each
    linear (by short name) quantized alone (`module_errors`, `module_kl`), empty otherwise."""

    model_fingerprint: str
    data_fingerprint: str
    bits: list[int]
    layers: int
    kl: list[dict[int, float]]
    weight_error: list[dict[int, float]]
    kl_uniform: dict[int, float] = field(default_factory=dict)  # whole model at each bit-width (8 included)
    module_kl: list[dict[str, dict[int, float]]] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    reference_storage: str = ""
    seconds: float = 0.0
    from_cache: bool = False

    def to_dict(self) -> dict:
        def keyed(rows):
            return [{str(b): v for b, v in sorted(r.items())} for r in rows]

        d = {
            "format": FORMAT,
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "bits": self.bits,
            "layers": self.layers,
            "kl": keyed(self.kl),
            "weight_error": keyed(self.weight_error),
            "kl_uniform": {str(b): v for b, v in sorted(self.kl_uniform.items())},
            "settings": self.settings,
            "reference_storage": self.reference_storage,
            "seconds": self.seconds,
        }
        if self.module_kl:
            d["module_kl"] = [{name: keyed([row])[0] for name, row in layer.items()} for layer in self.module_kl]
        return d

    @classmethod
    def from_dict(cls, obj: dict, *, source: str = RESULT_FILE) -> "Sensitivity":
        try:
            if obj.get("format") != FORMAT:
                raise KeyError("format")

            def unkeyed(rows):
                return [{int(b): float(v) for b, v in r.items()} for r in rows]

            result = cls(
                model_fingerprint=obj["model_fingerprint"], data_fingerprint=obj["data_fingerprint"],
                bits=[int(b) for b in obj["bits"]], layers=int(obj["layers"]), kl=unkeyed(obj["kl"]),
                weight_error=unkeyed(obj["weight_error"]),
                kl_uniform={int(b): float(v) for b, v in obj.get("kl_uniform", {}).items()},
                module_kl=[{name: unkeyed([row])[0] for name, row in layer.items()}
                           for layer in obj.get("module_kl", [])],
                settings=obj.get("settings", {}), reference_storage=obj.get("reference_storage", ""),
                seconds=float(obj.get("seconds", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProfileError(f"{source} is not a qradaptor sensitivity profile ({e})",
                               "rerun `qradaptor profile` to regenerate it") from None
        result.check(source)
        return result

    def check(self, source: str = RESULT_FILE) -> None:
        """Every layer has a finite, non-negative KL and weight error at every profiled bit-width."""
        fix = "rerun `qradaptor profile` to regenerate it (a hand-edited profile must keep this shape)"
        if self.layers < 1 or len(self.kl) != self.layers or len(self.weight_error) != self.layers:
            raise ProfileError(f"{source}: says {self.layers} layers but has {len(self.kl)} KL rows and "
                               f"{len(self.weight_error)} weight-error rows", fix)
        if self.module_kl and len(self.module_kl) != self.layers:
            raise ProfileError(f"{source}: says {self.layers} layers but has {len(self.module_kl)} per-module rows", fix)
        rows = [("KL", l, row) for l, row in enumerate(self.kl)]
        rows += [("weight error", l, row) for l, row in enumerate(self.weight_error)]
        rows += [(f"{m}'s KL", l, row) for l, layer in enumerate(self.module_kl) for m, row in layer.items()]
        for name, layer, row in rows:
            if set(self.bits) - set(row):
                raise ProfileError(f"{source}: layer {layer} has {name} at bits {sorted(row)}, the profile's bits "
                                   f"are {sorted(self.bits)}", fix)
            for b, v in row.items():
                # KL is non-negative; a few ulps below zero is rounding, not a bad probe
                if not math.isfinite(v) or v < -1e-6:
                    raise ProfileError(f"{source}: layer {layer} has {name} {v} at {b} bits; it must be a finite, "
                                       "non-negative number", fix)

    def check_layers(self, num_layers: int, source: str = RESULT_FILE) -> None:
        """The profile covers exactly the model's ``num_layers`` decoder layers."""
        if self.layers != num_layers:
            raise ProfileError(f"{source} profiles {self.layers} decoder layers but the model has {num_layers}",
                               "profile this model (qradaptor profile --model ... --out DIR) and pass that file")

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivity":
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"sensitivity file not found: {path}", "run `qradaptor profile --out DIR` first")
        try:
            obj = json.loads(read_text(path, ProfileError, "sensitivity file"))
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path} is not valid JSON ({e})", "rerun `qradaptor profile` to regenerate it") from None
        return cls.from_dict(obj, source=str(path))

    def save(self, out: str | Path) -> Path:
        return atomic_write_json(Path(out) / RESULT_FILE, self.to_dict())

    def ranking(self, bits: int | None = None) -> list[int]:
        """Layers from most to least sensitive at ``bits`` (default: the lowest profiled)."""
        b = min(self.bits) if bits is None else bits
        return sorted(range(self.layers), key=lambda l: -self.kl[l][b])

    def predicted_kl(self, bits_per_layer: list[int]) -> float:
        """Sum of per-layer KLs for a mixed plan (8 and 16 bits count as lossless)."""
        return sum(self.kl[l].get(b, 0.0) for l, b in enumerate(bits_per_layer) if b < 8)


# ---------------------------------------------------------------------------------------- reference


REFERENCE_STORAGE = "exact: negative entropy + expected output embedding per token (1 + hidden_size floats)"


@dataclass
class Reference:
    """The full model's next-token distribution on the calibration blocks, per batch, kept as what the
    KL needs (see the module docstring)."""

    neg_entropy: list[torch.Tensor]  # (B, S) float64: Σ_i p_i log p_i
    mean_embedding: list[torch.Tensor]  # (B, S, H) float32: Σ_i p_i W_i
    mean_bias: list[torch.Tensor]  # (B, S) float64: Σ_i p_i b_i (zero without a head bias)


class Head:
    """The final norm and LM head, applied in fp32 whatever the decoder's dtype."""

    def __init__(self, model: nn.Module):
        self.norm = final_norm(model)
        lm_head = model.get_output_embeddings()
        self.weight = lm_head.weight.detach().float()
        self.bias = None if lm_head.bias is None else lm_head.bias.detach().float()

    def hidden(self, last: torch.Tensor) -> torch.Tensor:
        return self.norm(last).float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        z = h @ self.weight.T
        return z if self.bias is None else z + self.bias

    def reference(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(self.logits(h), dim=-1)
        p = logp.exp()
        neg_entropy = (p * logp).sum(-1, dtype=torch.float64)
        mean_bias = torch.zeros_like(neg_entropy) if self.bias is None else (p @ self.bias).double()
        return neg_entropy, p @ self.weight, mean_bias

    def kl_sum(self, h: torch.Tensor, reference: Reference, batch: int) -> torch.Tensor:
        """Summed per-position KL(p_ref ‖ q) over one batch, from the probe's final hidden states ``h``."""
        lse = torch.logsumexp(self.logits(h), dim=-1).double()
        expected = (reference.mean_embedding[batch].double() * h.double()).sum(-1) + reference.mean_bias[batch]
        return (reference.neg_entropy[batch] - expected + lse).sum()


# ---------------------------------------------------------------------------------------- runner


class SuffixRunner:
    """Runs the decoder from any layer onward on the calibration blocks, from cached layer inputs.

    One full pass records the hidden states entering every decoder layer (and the per-batch extra
    arguments, such as rotary embeddings); ``logits_from(l, layer)`` then runs ``layer`` in place of layer
    ``l`` followed by the original layers ``l+1..L``, the final norm and the LM head.
    """

    def __init__(self, model: nn.Module, blocks: TokenBlocks, batch_size: int):
        self.model = model
        self.layers = [layer for _, layer in decoder_layers(model)]
        device = model_device(model)
        self.batches = [blocks.input_ids[i : i + batch_size].to(device) for i in range(0, len(blocks), batch_size)]
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.kwargs: list[dict] = []
        self.head = Head(model)
        self.reference = Reference([], [], [])
        hooks = [layer.register_forward_pre_hook(self._recorder(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            with torch.no_grad():
                for ids in self.batches:
                    last = backbone(model)(input_ids=ids, use_cache=False).last_hidden_state  # normed
                    for part, value in zip(
                        (self.reference.neg_entropy, self.reference.mean_embedding, self.reference.mean_bias),
                        self.head.reference(last.float()),
                    ):
                        part.append(value)
        finally:
            for h in hooks:
                h.remove()

    def _recorder(self, i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[i].append(hidden.detach())
            if i == 0:
                self.kwargs.append({k: v for k, v in kwargs.items()
                                    if k not in ("hidden_states", "cache", "past_key_values", "past_key_value")})

        return hook

    @torch.no_grad()
    def hidden_from(self, start: int, replacement: nn.Module, batch: int) -> torch.Tensor:
        """Final normed hidden states (fp32) with ``replacement`` in place of layer ``start``."""
        hidden = self.inputs[start][batch]
        kwargs = self.kwargs[batch]
        for i in range(start, len(self.layers)):
            layer = replacement if i == start else self.layers[i]
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.head.hidden(hidden)


    @torch.no_grad()
    def layer_output(self, start: int, layer: nn.Module, batch: int) -> torch.Tensor:
        """``layer`` run alone on the hidden states entering layer ``start`` (its output, before the next layer)."""
        out = layer(self.inputs[start][batch], **self.kwargs[batch])
        return out[0] if isinstance(out, tuple) else out


def quantized_layer(layer: nn.Module, layer_name: str, bits: int, group_size: int, cache: QuantCache,
                    only: str | None = None) -> nn.Module:
    """A copy of ``layer`` with every linear quantized at ``bits`` (from the cache); with ``only``, just the
    linears of that short name (``k_proj``: what a plan's `ModuleChoice` names), routed experts never."""
    linears = layer_linears(layer)
    if only is not None:
        experts = set(expert_holders(layer))
        linears = [(n, lin) for n, lin in linears if n.rsplit(".", 1)[-1] == only and n.rpartition(".")[0] not in experts]
    memo = {id(lin): None for _, lin in linears}  # do not copy the weights about to be replaced
    q = copy.deepcopy(layer, memo)
    for name, lin in linears:
        set_child(q, name, cache.get(f"{layer_name}.{name}", lin, bits, group_size))
    return q


def weight_error_terms(layer: nn.Module, qlayer: nn.Module, backend: QuantBackend) -> tuple[float, float]:
    """Squared Frobenius error of a layer's quantized linears, and their squared norm."""
    err = norm = 0.0
    q_modules = dict(qlayer.named_modules())
    for name, lin in layer_linears(layer):
        w = lin.weight.detach().float()
        err += float((backend.dequantize(q_modules[name]).float() - w).pow(2).sum())
        norm += float(w.pow(2).sum())
    return err, norm


def layer_weight_error(layer: nn.Module, qlayer: nn.Module, backend: QuantBackend) -> float:
    """Relative squared Frobenius error of a layer's quantized linears."""
    err, norm = weight_error_terms(layer, qlayer, backend)
    return err / norm


def module_errors(runner: SuffixRunner, start: int, layer: nn.Module, layer_name: str, qlayer: nn.Module, bits: int,
                  group_size: int, cache: QuantCache, batches: int) -> tuple[dict[str, float], float]:
    """Squared error each linear of layer ``start`` (by short name) causes in the layer's output when quantized
    alone at ``bits``, on the first ``batches`` calibration batches; and the error of ``qlayer`` (all of them
    quantized) on the same tokens. One layer's forward each: a linear's share of the layer's error is what
    `module_kl` splits the layer's measured KL by."""
    reference = [runner.layer_output(start, layer, b) for b in range(batches)]

    def error(replacement: nn.Module) -> float:
        return sum(float((runner.layer_output(start, replacement, b).float() - reference[b].float()).pow(2).sum())
                   for b in range(batches))

    names = linear_names(layer)
    return ({name: error(quantized_layer(layer, layer_name, bits, group_size, cache, only=name)) for name in names},
            error(qlayer))


def module_kl(kl: float, errors: dict[str, float], total: float) -> dict[str, float]:
    """A layer's KL at some bit-width split among its linears as their output errors (`module_errors`) compare
    with the whole layer's: each linear's estimated KL when quantized alone."""
    return {name: kl * e / total if total > 0 else 0.0 for name, e in errors.items()}


def mean_kl(runner: SuffixRunner, start: int, replacement: nn.Module) -> float:
    """Mean per-token KL with ``replacement`` in place of layer ``start``."""
    total, positions = 0.0, 0
    for b, ids in enumerate(runner.batches):
        total += float(runner.head.kl_sum(runner.hidden_from(start, replacement, b), runner.reference, b))
        positions += ids.numel()
    return total / positions


def model_kl(model: nn.Module, runner: SuffixRunner) -> float:
    """Mean per-token KL of a whole (e.g. mixed-precision) model from the runner's reference: one full
    forward of ``model`` on the runner's calibration batches."""
    total, positions = 0.0, 0
    with torch.no_grad():
        for b, ids in enumerate(runner.batches):
            last = backbone(model)(input_ids=ids, use_cache=False).last_hidden_state  # already normed
            total += float(runner.head.kl_sum(last.float(), runner.reference, b))
            positions += ids.numel()
    return total / positions


# ---------------------------------------------------------------------------------------- the profile


def calibration_blocks(tokenizer, settings: ProfileSettings, model=None) -> TokenBlocks:
    """``settings.tokens`` worth of blocks from the training split, spread over it (seeded); ``model``: whose
    embedding the ids must fit."""
    blocks = load_blocks(settings.data, tokenizer, "train", seq_len=settings.seq_len, seed=settings.seed, model=model)
    need = settings.num_blocks
    if settings.tokens is None and len(blocks) < need:
        log.warning("profile: the training split has %d blocks of %d tokens, fewer than the default %d tokens; "
                    "profiling on all of them", len(blocks), settings.seq_len, DEFAULT_TOKENS)
        need = len(blocks)
    if len(blocks) < need:
        raise DataError(
            f"the calibration set has {len(blocks) * settings.seq_len} tokens ({len(blocks)} blocks of "
            f"{settings.seq_len}), but the profile needs {need * settings.seq_len} (--tokens {settings.tokens})",
            f"pass --tokens {len(blocks) * settings.seq_len} or less, or more training data",
        )
    gen = torch.Generator().manual_seed(settings.seed)
    pick = torch.randperm(len(blocks), generator=gen)[:need].sort().values
    return TokenBlocks(blocks.input_ids[pick], blocks.labels[pick])


def profile_key(model_fp: str, data_fp: str, settings: ProfileSettings) -> str:
    payload = json.dumps({"format": FORMAT, "model": model_fp, "data": data_fp, "settings": settings.to_dict()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _check_out_dir(out: Path, model_fp: str, force: bool) -> None:
    existing = out / RESULT_FILE
    if not existing.is_file() or force:
        return
    try:
        other = json.loads(existing.read_text(encoding="utf-8")).get("model_fingerprint")
    except (OSError, json.JSONDecodeError):
        other = None
    if other != model_fp:
        raise ProfileError(
            f"{out} already holds a sensitivity profile of a different model (fingerprint {str(other)[:12]}…, "
            f"this model is {model_fp[:12]}…)",
            "choose another --out directory, or pass --force to replace it",
        )


def _load_partial(out: Path, key: str) -> dict:
    path = out / PARTIAL_FILE
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    if obj.get("key") != key:
        return {}
    return obj.get("probes", {})


def weights_dtype(model: nn.Module) -> str:
    """The dtype of a model's floating-point weights by name (``float32``, ``bfloat16``): a model's fingerprint covers
    its weights as loaded, so the same checkpoint loaded in another dtype is another model to a profile."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def profile_model(
    model: nn.Module,
    tokenizer,
    settings: ProfileSettings | None = None,
    *,
    out: str | Path | None = None,
    force: bool = False,
    use_cache: bool = True,
    cache: QuantCache | None = None,
    blocks: TokenBlocks | None = None,
    progress: bool = True,
    on_probe: Callable[[int, int, float], None] | None = None,
    device: torch.device | str | None = None,
) -> Sensitivity:
    """Profile ``model`` (full precision). See the module docstring; ``blocks`` overrides the calibration
    data (used by the validation); ``on_probe(layer, bits, kl)`` is called after each probe. ``device``
    (default: where ``model`` is): where the probes compute; ``model`` is moved there for the profile and
    back afterwards."""
    settings = settings or ProfileSettings()
    start_time = time.perf_counter()
    model_fp = model_fingerprint(model)
    backend = cache.backend if cache is not None else get_backend(settings.backend, compute_dtype=settings.torch_dtype)
    lacking = [b for b in settings.bits if b not in backend.supported_bits]
    if lacking:
        raise ProfileError(f"the {backend.name} backend cannot store {', '.join(map(str, lacking))}-bit weights",
                           f"profile bits it stores ({', '.join(map(str, backend.supported_bits))}), or pass "
                           "--backend hqq (it stores every bit-width 2..8)")
    out = Path(out) if out is not None else None
    if out is not None:
        _check_out_dir(out, model_fp, force)
    if blocks is None:
        blocks = calibration_blocks(tokenizer, settings, model)
        data_fp = data_fingerprint(settings.data, "train", settings.seq_len, seed=settings.seed)
    else:
        data_fp = hashlib.sha256(blocks.input_ids.numpy().tobytes()).hexdigest()
    key = profile_key(model_fp, data_fp, settings)
    cached = cache_dir() / "profiles" / f"{key}.json"
    if use_cache and cached.is_file():
        try:
            result = Sensitivity.load(cached)
        except ProfileError as e:  # the cache is ours: a damaged entry is recomputed, not reported
            log.warning("profile: ignoring the damaged cache entry %s (%s); profiling again", cached, e.cause)
            cached.unlink(missing_ok=True)
        else:
            result.from_cache = True
            log.info("profile: used the cached result %s", cached)
            if out is not None:
                _write_outputs(result, out)
            return result

    home = model_device(model)
    device = torch.device(device) if device is not None else home
    try:
        return _profile(model, settings, blocks, device, backend, cache, out, key, model_fp, data_fp, cached,
                        use_cache, progress, on_probe, start_time)
    finally:
        model.to(home)


def _profile(model, settings, blocks, device, backend, cache, out, key, model_fp, data_fp, cached, use_cache,
             progress, on_probe, start_time) -> Sensitivity:
    work = model if next(model.parameters()).dtype == settings.torch_dtype else copy.deepcopy(model).to(settings.torch_dtype)
    work.to(device).eval()
    cache = cache or QuantCache(backend)
    runner = SuffixRunner(work, blocks, settings.batch_size)

    layers = decoder_layers(work)
    probes: dict = _load_partial(out, key) if out is not None else {}
    todo = [(l, b) for l in range(len(layers)) for b in settings.bits if f"{l}:{b}" not in probes]
    if probes:
        log.info("profile: resuming, %d of %d probes already done", len(probes), len(probes) + len(todo))
    bar = tqdm(todo, desc="profile", unit="probe", disable=not progress)
    # the per-module estimates run on the first module_tokens' worth of the calibration batches
    module_batches = min(len(runner.batches), max(1, -(-settings.module_tokens // (settings.batch_size
                                                                                  * settings.seq_len))))
    for l, b in bar:
        rebalance()
        name, layer = layers[l]
        qlayer = quantized_layer(layer, name, b, settings.group_size, cache)
        kl = mean_kl(runner, l, qlayer)
        probes[f"{l}:{b}"] = {"kl": kl, "weight_error": layer_weight_error(layer, qlayer, backend)}
        if settings.modules:
            errors, total = module_errors(runner, l, layer, name, qlayer, b, settings.group_size, cache,
                                          module_batches)
            probes[f"{l}:{b}"].update(module_errors=errors, output_error=total)
        bar.set_postfix(layer=l, bits=b, kl=f"{kl:.4f}")
        if out is not None:
            atomic_write_json(out / PARTIAL_FILE, {"key": key, "probes": probes})
        if on_probe is not None:
            on_probe(l, b, kl)

    # 8 bits for the whole model: one forward shows whether 8 bits is worth its bytes anywhere.
    from .plan import Plan
    from .quantize import quantize_model

    kl_uniform = {}
    if 8 in backend.supported_bits:
        eight = quantize_model(work, Plan.uniform(len(layers), 8, 1, group_size=settings.group_size), cache=cache)
        kl_uniform[8] = model_kl(eight, runner)
        del eight
    weight_error_8 = [layer_weight_error(layer, quantized_layer(layer, name, 8, settings.group_size, cache), backend)
                      for name, layer in layers] if 8 in backend.supported_bits else [None] * len(layers)

    result = Sensitivity(
        model_fingerprint=model_fp, data_fingerprint=data_fp, bits=list(settings.bits), layers=len(layers),
        kl=[{b: probes[f"{l}:{b}"]["kl"] for b in settings.bits} for l in range(len(layers))],
        weight_error=[{**{b: probes[f"{l}:{b}"]["weight_error"] for b in settings.bits},
                       **({8: weight_error_8[l]} if weight_error_8[l] is not None else {})} for l in range(len(layers))],
        kl_uniform=kl_uniform,
        module_kl=[_module_rows(probes, l, settings.bits) for l in range(len(layers))] if settings.modules else [],
        settings={**settings.to_dict(), "calibration_tokens": int(blocks.input_ids.numel()),
                                         "model_dtype": weights_dtype(model)},
        reference_storage=REFERENCE_STORAGE,
        seconds=time.perf_counter() - start_time,
    )
    if use_cache:
        atomic_write_json(cached, result.to_dict())
    if out is not None:
        _write_outputs(result, out)
        (out / PARTIAL_FILE).unlink(missing_ok=True)
    return result


def _module_rows(probes: dict, layer: int, bits) -> dict[str, dict[int, float]]:
    """Layer ``layer``'s `Sensitivity.module_kl` row from its probes: short name → bits → estimated KL."""
    per_bits = {b: module_kl(probes[f"{layer}:{b}"]["kl"], probes[f"{layer}:{b}"]["module_errors"],
                             probes[f"{layer}:{b}"]["output_error"]) for b in bits}
    return {name: {b: per_bits[b][name] for b in bits} for name in per_bits[bits[0]]}


def _write_outputs(result: Sensitivity, out: Path) -> None:
    result.save(out)
    try:
        plot_heatmap(result, out / HEATMAP_FILE)
    except Exception as e:  # a plot must never lose the profile
        log.warning("profile: could not draw the heatmap (%s)", e)


def plot_heatmap(result: Sensitivity, path: Path) -> Path:
    """Layers × bits heatmap of the KL, log colour scale; beside it, with per-module estimates, layers × linears at
    the lowest bit-width."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry to touch

    data = [[max(result.kl[l][b], 1e-8) for b in result.bits] for l in range(result.layers)]
    names = list(result.module_kl[0]) if result.module_kl else []
    lowest = min(result.bits)
    fig = Figure(figsize=(1.2 + 0.9 * len(result.bits) + (2.0 + 0.6 * len(names) if names else 0),
                          1.5 + 0.22 * result.layers))
    axes = fig.subplots(1, 2 if names else 1, squeeze=False)[0]
    # one colour scale for layers and modules: a module's estimate is a share of its layer's KL
    norm = LogNorm(vmin=min(min(r) for r in data) / (10 if names else 1), vmax=max(max(r) for r in data))
    panels = [(axes[0], data, [f"{b}-bit" for b in result.bits], "KL(full ‖ one layer quantized)")]
    if names:
        modules = [[max(result.module_kl[l][m][lowest], 1e-8) for m in names] for l in range(result.layers)]
        panels.append((axes[1], modules, names, f"one linear quantized at {lowest} bits (estimate)"))
    for ax, values, labels, title in panels:
        im = ax.imshow(values, aspect="auto", cmap="viridis", norm=norm)
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=45 if ax is not axes[0] else 0)
        ax.set_yticks(range(result.layers), [str(l) for l in range(result.layers)], fontsize=7)
        ax.set_ylabel("decoder layer")
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=list(axes), label="mean per-token KL (log scale)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------- validation


def stability(model: nn.Module, settings: ProfileSettings, blocks: TokenBlocks, *, progress: bool = False) -> dict:
    """Is the prior stable? Profile two disjoint halves of ``blocks`` at the lowest bit-width and return
    the Spearman correlation of the per-layer KLs (and both profiles)."""
    from scipy.stats import spearmanr

    half = len(blocks) // 2
    if half < 1:
        raise DataError("the stability check needs at least 2 calibration blocks", "pass more tokens")
    lowest = ProfileSettings(**{**asdict(settings), "bits": (min(settings.bits),)})
    halves = [TokenBlocks(blocks.input_ids[s], blocks.labels[s]) for s in (slice(0, half), slice(half, 2 * half))]
    runs = [profile_model(model, None, lowest, blocks=h, use_cache=False, progress=progress) for h in halves]
    b = lowest.bits[0]
    a, c = ([r.kl[l][b] for l in range(r.layers)] for r in runs)
    return {"bits": b, "spearman": float(spearmanr(a, c).statistic), "kl_first_half": a, "kl_second_half": c}


def additivity(model: nn.Module, sensitivity: Sensitivity, settings: ProfileSettings, blocks: TokenBlocks, *,
               plans: int = 20, seed: int = 0, bits_choices: tuple[int, ...] | None = None,
               progress: bool = False) -> dict:
    """Does the prior add up? For ``plans`` random mixed plans, the Spearman correlation between the sum of
    per-layer KLs and the measured KL of the whole mixed model (one forward each)."""
    from scipy.stats import spearmanr

    from .plan import LayerChoice, Plan
    from .quantize import quantize_model

    choices = bits_choices or tuple(sensitivity.bits) + (8,)
    backend = get_backend(settings.backend, compute_dtype=settings.torch_dtype)
    work = model if next(model.parameters()).dtype == settings.torch_dtype else copy.deepcopy(model).to(settings.torch_dtype)
    runner = SuffixRunner(work, blocks, settings.batch_size)  # for its reference and head
    cache = QuantCache(backend)
    gen = torch.Generator().manual_seed(seed)
    predicted, measured, layouts = [], [], []
    for _ in tqdm(range(plans), desc="additivity", disable=not progress):
        bits = [choices[int(i)] for i in torch.randint(len(choices), (sensitivity.layers,), generator=gen)]
        mixed = quantize_model(work, Plan([LayerChoice(b, 1) for b in bits], group_size=settings.group_size), cache=cache)
        measured.append(model_kl(mixed, runner))
        predicted.append(sensitivity.predicted_kl(bits))
        layouts.append(bits)
        del mixed
    return {"plans": plans, "spearman": float(spearmanr(predicted, measured).statistic), "predicted": predicted,
            "measured": measured, "bits": layouts}


def module_agreement(model: nn.Module, sensitivity: Sensitivity, settings: ProfileSettings, blocks: TokenBlocks, *,
                     bits: int | None = None, progress: bool = False) -> dict:
    """Does the per-module estimate (`Sensitivity.module_kl`) rank linears as their real KL does? For every linear
    of every layer at ``bits`` (default: the lowest profiled), the KL with that linear alone quantized, measured as
    a layer's probe is (the rest of the network run on all of ``blocks``): the Spearman correlation with the
    estimate over all (layer, linear) pairs, and the mean of the per-layer ones (which linear of a layer to spare)."""
    from scipy.stats import spearmanr

    if not sensitivity.module_kl:
        raise ProfileError("this profile has no per-module estimates", "profile with --modules")
    b = min(sensitivity.bits) if bits is None else bits
    backend = get_backend(settings.backend, compute_dtype=settings.torch_dtype)
    work = model if next(model.parameters()).dtype == settings.torch_dtype else copy.deepcopy(model).to(settings.torch_dtype)
    runner = SuffixRunner(work, blocks, settings.batch_size)
    cache = QuantCache(backend)
    layers = decoder_layers(work)
    measured = [{m: mean_kl(runner, l, quantized_layer(layer, name, b, settings.group_size, cache, only=m))
                 for m in sensitivity.module_kl[l]}
                for l, (name, layer) in enumerate(tqdm(layers, desc="per-module probes", disable=not progress))]
    estimated = [{m: row[b] for m, row in layer.items()} for layer in sensitivity.module_kl]
    pairs = [(estimated[l][m], measured[l][m]) for l in range(len(layers)) for m in measured[l]]
    within = [float(spearmanr(list(estimated[l].values()), [measured[l][m] for m in estimated[l]]).statistic)
              for l in range(len(layers))]
    return {"bits": b, "spearman": float(spearmanr(*zip(*pairs)).statistic),
            "spearman_within_layers": sum(within) / len(within), "measured": measured, "estimated": estimated}
