"""GGUF export, for llama.cpp and what is built on it (Ollama, LM Studio): a trained run's quantized base as
``model.gguf`` and its LoRA adapter as ``adapter.gguf``.

HQQ's asymmetric code ``w = (q − z)·s`` (groups along the input dimension) is GGUF's ``Q4_1``/``Q5_1`` block form
``w = d·q + m`` with ``d = s`` and ``m = −z·s`` (fp16 block constants, 32 weights a block): a group of 64 is two
blocks with the same constants. So a 2- to 4-bit linear is written as ``Q4_1`` and a 5-bit one as ``Q5_1`` with its
own codes, exact up to the fp16 rounding of ``d`` and ``m``; 6- to 8-bit linears have no such type and are
requantized to ``Q8_0`` (symmetric, 8 bits: the error is ``Q8_0``'s own). A linear whose groups do not fall into
whole blocks is requantized to ``Q8_0`` too. Unquantized weights keep the base dtype (``F32`` or ``BF16``), norms
are ``F32``. llama.cpp's Llama graph expects the query and key rows in Meta's interleaved-rotary order, which the
Hugging Face layout permutes (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``): the export permutes them back
(codes, constants and the adapters' ``lora_b`` rows alike).

The adapter is llama.cpp's LoRA format (``blk.N.attn_q.weight.lora_a``/``lora_b``). llama.cpp scales every
adapter pair by ``alpha / rank`` with one ``alpha`` for the file, which cannot express per-module scales in
general; the export writes ``alpha = 0`` (llama.cpp then applies no ``alpha / rank`` factor) and folds each
module's own PEFT scale into its ``lora_b``.

The metadata (hyperparameters, tokenizer, chat template) is copied from the GGUF file the base was loaded from, or
written from its transformers config and tokenizer (`gguf_metadata`). Architectures: Llama (q/k rows permuted) and
Qwen2/Qwen3 (rows as they are; Qwen2's q/k/v biases and Qwen3's q/k norms as llama.cpp names them).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backends import is_quantized
from .errors import ArtifactError

#: What llama.cpp's Modelfile for Ollama holds (paths relative to it).
MODELFILE = "FROM ./model.gguf\nADAPTER ./adapter.gguf\n"
MERGED_GGUF = "merged.gguf"  # the adapters merged into the base: one file (`write_gguf(merged=True)`)
BLOCK = 32  # weights per Q4_1 / Q5_1 / Q8_0 block


@dataclass
class GGUFReport:
    """What an export wrote: tensors per GGUF type, and per type the relative squared error of the written
    decoder-linear weights against the weights qradaptor computes with (sum over tensors of ‖Δ‖² / ‖W‖²)."""

    types: dict[str, int] = field(default_factory=dict)
    squares: dict[str, list[float]] = field(default_factory=dict)  # type -> [Σ‖Δ‖², Σ‖W‖²]
    model_bytes: int = 0
    adapter_bytes: int = 0
    dtype: str = ""  # of the unquantized weights (the run's)
    merged: dict | None = None  # merged.gguf's report (its errors against the merged weights), where written

    def add(self, kind: str, written: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> None:
        self.types[kind] = self.types.get(kind, 0) + 1
        if written is not None:
            sums = self.squares.setdefault(kind, [0.0, 0.0])
            sums[0] += float((written - weight).double().pow(2).sum())
            sums[1] += float(weight.double().pow(2).sum())

    def to_dict(self) -> dict:
        error = {k: (e / n if n else 0.0) for k, (e, n) in self.squares.items()}
        out = {"types": dict(sorted(self.types.items())), "relative_error": error,
               "model_bytes": self.model_bytes, "adapter_bytes": self.adapter_bytes, "dtype": self.dtype}
        return {**out, "merged": self.merged} if self.merged is not None else out


def check_exportable(spec: str | None):
    """The metadata the export writes for the base ``spec`` (`gguf_metadata.metadata_for`: ``arch`` and
    ``write(writer)``), or one clear refusal, before anything is written."""
    from .gguf_metadata import metadata_for

    return metadata_for(spec)


def _permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's Llama graph wants for a q or k projection of ``heads`` heads (HF → Meta layout)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _block_bytes(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> tuple[np.ndarray, str]:
    """Q4_1 (codes < 16) or Q5_1 (codes < 32) blocks of ``codes`` ``(rows, in)`` with per-block ``d``, ``m``
    ``(rows, in / 32)``: uint8 ``(rows, bytes per row)``."""
    rows = codes.shape[0]
    q = codes.reshape(-1, BLOCK).numpy().astype(np.uint8)
    d16 = d.reshape(-1, 1).numpy().astype(np.float16).view(np.uint8)
    m16 = m.reshape(-1, 1).numpy().astype(np.float16).view(np.uint8)
    low = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    if bits <= 4:
        blocks, kind = np.concatenate([d16, m16, low], axis=1), "Q4_1"
    else:
        high = np.packbits((q >> 4) & 1, axis=-1, bitorder="little")
        blocks, kind = np.concatenate([d16, m16, high, low], axis=1), "Q5_1"
    return np.ascontiguousarray(blocks.reshape(rows, -1)), kind


def linear_type(bits: int, group_size: int, in_features: int, *, has_codes: bool, dense: str) -> str:
    """The GGUF type a decoder linear of ``bits`` (group ``group_size``) is written in: its own codes as ``Q4_1``
    (2–4 bits) or ``Q5_1`` (5 bits) where its groups fall into whole 32-weight blocks and its module exposes them
    (``has_codes``: HQQ's), else ``Q8_0``; ``dense`` (``F32``/``BF16``, the run's dtype) at 16 bits. The one rule
    the export writes by and the GGUF sizes are priced by."""
    from .plan import UNQUANTIZED_BITS

    if bits == UNQUANTIZED_BITS:
        return dense
    exact = has_codes and bits <= 5 and group_size % BLOCK == 0 and in_features % group_size == 0
    return ("Q4_1" if bits <= 4 else "Q5_1") if exact else "Q8_0"


def exposes_codes(module_or_class) -> bool:
    """Whether a backend's modules expose their integer codes (``codes()``) for the exact Q4_1/Q5_1 blocks."""
    return callable(getattr(module_or_class, "codes", None))


def _quantized_tensor(module, perm: torch.Tensor | None) -> tuple[np.ndarray, str, torch.Tensor]:
    """A quantized linear's weight as GGUF bytes, its GGUF type, and the weight qradaptor computes with (fp32,
    rows in the written order)."""
    import gguf

    weight = module.dequantize().float()
    rows, cols = weight.shape
    kind = linear_type(module.bits, module.group_size, cols, has_codes=exposes_codes(module), dense="F32")
    if perm is not None:
        weight = weight[perm]
    if kind == "Q8_0":
        data = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
        return data, "Q8_0", weight
    per_group = module.group_size // BLOCK  # blocks per group, which share its constants
    codes = module.codes()
    # copies: a loaded module's buffers can be inference tensors, whose views are refused outside inference mode
    scale = module.scale.float().clone().reshape(rows, -1)
    zero = module.zero.float().clone().reshape(rows, -1)
    if perm is not None:
        codes, scale, zero = codes[perm], scale[perm], zero[perm]
    d = scale.repeat_interleave(per_group, dim=1)
    m = (-zero * scale).repeat_interleave(per_group, dim=1)
    data, kind = _block_bytes(codes, d, m, module.bits)
    return data, kind, weight


def _dense_tensor(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """An unquantized tensor as written: norms and biases (1-D) and fp32 weights as F32; bf16 weights as BF16
    bytes (what they are stored as, which llama.cpp computes with)."""
    t = t.detach().cpu()
    if t.dim() < 2 or t.dtype == torch.float32:
        return t.float().contiguous().numpy(), "F32"
    return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy(), "BF16"


def _dequantized(data: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])


def _add_file_type(writer, types) -> None:
    import gguf

    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if types.get("Q4_1") else gguf.LlamaFileType.ALL_F32)


def _name_map(arch: str, layers: int):
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), layers)


def _gguf_name(tmap, key: str) -> str:
    name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ArtifactError(f"the GGUF export does not know where llama.cpp expects the tensor {key}",
                            "export without --gguf (this architecture's tensors are not all mapped yet)")
    return name


def write_gguf(trained, out: str | os.PathLike, spec: str | None, *, merged: bool = False) -> GGUFReport:
    """``out/model.gguf``, ``out/adapter.gguf`` and ``out/Modelfile`` for a trained run (`export.TrainedModel`)
    whose base was loaded from ``spec`` (a GGUF file, a transformers directory or hub id); with ``merged``, also
    ``out/merged.gguf``: one file with every adapter merged into its weight (`_merged_tensor`), the size of
    ``model.gguf``. Refuses a base it cannot describe to llama.cpp (`gguf_metadata`), before writing anything."""
    source = check_exportable(spec)
    arch = source.arch
    base = trained.model.get_base_model()
    config = base.config
    layers = config.num_hidden_layers
    tmap = _name_map(arch, layers)
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}

    def permutation(key: str, rows: int) -> torch.Tensor | None:
        """The row order of the tensor ``key`` (``...q_proj.weight``) in llama.cpp, where it is not the HF one."""
        module = key.rsplit(".", 2)[-2]
        return _permutation(rows, heads[module]) if arch == "llama" and module in heads else None

    report = GGUFReport(dtype=str(base.get_input_embeddings().weight.dtype).removeprefix("torch."))
    out = Path(out)
    report.model_bytes = _write_model(out / "model.gguf", base, source, tmap, permutation, report)
    report.adapter_bytes = write_adapter(trained.model, out / "adapter.gguf", arch, tmap, permutation)
    (out / "Modelfile").write_text(MODELFILE, encoding="utf-8")
    if merged:
        merged_report = GGUFReport(dtype=report.dtype)
        merged_report.model_bytes = _write_model(out / MERGED_GGUF, base, source, tmap, permutation,
                                                 merged_report, adapters=_adapted_modules(trained.model))
        report.merged = merged_report.to_dict()
    return report


def _write_model(path: Path, base, source, tmap, permutation, report: GGUFReport,
                 adapters: dict | None = None) -> int:
    """The base model ``base`` (quantized, adapters aside) as a GGUF file at ``path``; with ``adapters`` (module
    name → PEFT LoRA layer), each adapted weight merged with its adapter and written in the same GGUF type
    (`_merged_tensor`). Returns the file's size."""
    import gguf

    adapters = adapters or {}
    writer = _writer(path, source.arch)
    source.write(writer)
    quantized = {n.removesuffix(".base_layer"): m for n, m in base.named_modules() if is_quantized(m)}
    tied = getattr(base.config, "tie_word_embeddings", False)
    with torch.no_grad():
        for key, tensor in base.state_dict().items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            owner, _, leaf = key.rpartition(".")
            if tied and key == "lm_head.weight":
                continue  # llama.cpp uses token_embd for the output when there is no output tensor
            if owner in quantized and leaf in ("scale", "zero"):
                continue  # inside the packed weight's blocks
            if owner in quantized and leaf == "packed":
                perm = permutation(owner + ".weight", quantized[owner].out_features)
                if owner in adapters:
                    data, kind, weight = _merged_tensor(quantized[owner], _lora_delta(adapters[owner]), perm)
                else:
                    data, kind, weight = _quantized_tensor(quantized[owner], perm)
                report.add(kind, torch.from_numpy(_dequantized(data, kind)), weight)
                writer.add_tensor(_gguf_name(tmap, owner + ".weight"), data,
                                  raw_dtype=gguf.GGMLQuantizationType[kind])
                continue
            if owner in adapters and leaf == "weight":  # a 16-bit layer: merged in its own dtype
                tensor = (tensor.float() + _lora_delta(adapters[owner])).to(tensor.dtype)
            perm = permutation(key, tensor.shape[0])
            data, kind = _dense_tensor(tensor[perm] if perm is not None else tensor)
            report.add(kind)
            writer.add_tensor(_gguf_name(tmap, key), data,
                              raw_dtype=None if kind == "F32" else gguf.GGMLQuantizationType[kind])
    for name, data in source.tensors().items():
        report.add("F32")
        writer.add_tensor(name, data)
    _add_file_type(writer, report.types)
    _finish(writer)
    return path.stat().st_size


def _adapted_modules(peft_model) -> dict:
    """Module name in the base model (``model.layers.0.self_attn.q_proj``) → its PEFT LoRA layer."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix): module for name, module in peft_model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def _lora_delta(layer) -> torch.Tensor:
    """What a PEFT LoRA layer adds to its base weight: ``scale · B·A`` (fp32)."""
    a = layer.lora_A["default"].weight.float()
    b = layer.lora_B["default"].weight.float()
    return (b * layer.scaling["default"]) @ a


def _merged_tensor(module, delta: torch.Tensor, perm: torch.Tensor | None) -> tuple[np.ndarray, str, torch.Tensor]:
    """A quantized linear's weight with its adapter merged, as GGUF bytes of the same type the unmerged weight is
    written in (so the file is no larger): requantized by HQQ at 4 (``Q4_1``) or 5 (``Q5_1``) bits in groups of
    one block, whatever the layer's own bits (``Q4_1`` holds 4-bit codes: fewer would only lose), or by ``Q8_0``.
    Also returns the merged weight (fp32, rows in the written order)."""
    import gguf

    from .backends import get_backend

    weight = module.dequantize().float() + delta
    rows, cols = weight.shape
    kind = linear_type(module.bits, module.group_size, cols, has_codes=exposes_codes(module), dense="F32")
    if perm is not None:
        weight = weight[perm]
    if kind == "Q8_0":
        return gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0), kind, weight
    linear = torch.nn.Linear(cols, rows, bias=False)
    linear.weight.data = weight
    requantized = get_backend("hqq", compute_dtype=torch.float32).quantize(linear, 4 if kind == "Q4_1" else 5, BLOCK)
    data, kind, _ = _quantized_tensor(requantized, None)
    return data, kind, weight


def write_adapter(peft_model, path: Path, arch: str, tmap, permutation) -> int:
    """The LoRA adapters of ``peft_model`` in llama.cpp's adapter format at ``path``; returns its size."""
    writer = _adapter_writer(path, arch)
    with torch.no_grad():
        for key, module in _adapted_modules(peft_model).items():
            a = module.lora_A["default"].weight.float()
            b = module.lora_B["default"].weight.float() * module.scaling["default"]
            perm = permutation(key + ".weight", b.shape[0])
            if perm is not None:
                b = b[perm]
            target = _gguf_name(tmap, key + ".weight")  # blk.N.attn_q.weight
            # numpy (r, in) and (out, r): GGUF's ne = [in, r] and [r, out], as llama.cpp checks them
            writer.add_tensor(f"{target}.lora_a", a.cpu().contiguous().numpy())
            writer.add_tensor(f"{target}.lora_b", b.cpu().contiguous().numpy())
    _finish(writer)
    return path.stat().st_size


def _adapter_writer(path: Path | None, arch: str):
    writer = _writer(path, arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 0.0)  # no alpha / rank factor: each lora_b carries its own scale
    return writer


@contextmanager
def _quiet_writer():
    """gguf's writer logs the files it opens at INFO level, which qradaptor's log would print."""
    logger = logging.getLogger("gguf.gguf_writer")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _writer(path, arch: str):
    import gguf

    with _quiet_writer():
        return gguf.GGUFWriter(path, arch)


def _finish(writer) -> None:
    with _quiet_writer():
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


# ---------------------------------------------------------------------------------------- sizes
#: GGUF's data alignment (``gguf.GGUF_DEFAULT_ALIGNMENT``): every tensor's data, and the header, are padded to it.
ALIGNMENT = 32


def _padded(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def tensor_bytes(kind: str, numel: int) -> int:
    """Bytes of ``numel`` values in the GGUF type ``kind`` (rows are whole blocks: the types written here hold
    rows whose length is a multiple of 32)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return numel // block * size


def dense_type(dtype_bytes: int) -> str:
    """The GGUF type of unquantized 2-D weights in a run of ``dtype_bytes`` per value (`_dense_tensor`)."""
    return "F32" if dtype_bytes == 4 else "BF16"


def layer_gguf_bytes(layer: list, choice, *, group_size: int, target_modules: tuple[str, ...], dense: str,
                     has_codes: bool) -> tuple[int, int]:
    """What one decoder layer's linears (`memory.LinearShape`) take in ``model.gguf`` under ``choice`` (each in
    its `linear_type`), and what their adapters take in ``adapter.gguf`` (``lora_a`` and ``lora_b`` in F32), both
    with each tensor's padding. The one place a layer's GGUF bytes are priced: `predict_gguf` sums it, the
    search's planner prices ``gguf:`` budgets with it."""
    from .memory import adapted_shapes

    def own_type(s) -> str:  # each linear at its own bits and group size (the plan's: ``group_size``)
        own = choice.of(s.name)
        return linear_type(own.bits, own.group_size or group_size, s.in_features, has_codes=has_codes, dense=dense)

    model = sum(_padded(tensor_bytes(own_type(s), s.numel)) for s in layer)
    adapted = [(s, choice.of(s.name).rank) for s in adapted_shapes(layer, target_modules)]
    adapter = sum(_padded(4 * rank * s.in_features) + _padded(4 * s.out_features * rank) for s, rank in adapted)
    return model, adapter


def distinct_bits(bits, shapes, *, group_size: int, has_codes: bool) -> tuple[int, ...]:
    """The bit-widths of ``bits`` worth choosing when the GGUF files are what is paid for: those written in a type
    no higher one of ``bits`` is written in, for some linear of ``shapes`` (2 and 3 bits take Q4_1's bytes, as 4
    bits do, and 6 bits Q8_0's, as 8 bits do: the same bytes for less)."""
    widths = {s.in_features for layer in shapes.layers for s in layer}
    ordered = sorted(bits)

    def kinds(b: int) -> set:
        return {linear_type(b, group_size, w, has_codes=has_codes, dense="F32") for w in widths}

    return tuple(b for i, b in enumerate(ordered) if i == len(ordered) - 1 or kinds(b) != kinds(ordered[i + 1]))


@dataclass
class GGUFSize:
    """Bytes of the files `write_gguf` writes for a plan: ``model.gguf`` and ``adapter.gguf`` (their sum is what a
    ``gguf:`` budget bounds); ``fixed_bytes``: the part no plan changes (both headers, with the tokenizer, and the
    tensors outside the decoder linears); ``types``: decoder linears per GGUF type."""

    model_bytes: int
    adapter_bytes: int
    fixed_bytes: int
    types: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.adapter_bytes

    def to_dict(self) -> dict:
        return {"model_bytes": self.model_bytes, "adapter_bytes": self.adapter_bytes, "total_bytes": self.total_bytes,
                "fixed_bytes": self.fixed_bytes, "types": dict(sorted(self.types.items()))}


def predict_gguf(model, plan, backend, *, spec: str | None, dtype: torch.dtype) -> GGUFSize:
    """The exact sizes of ``model.gguf`` and ``adapter.gguf`` that ``export --gguf`` writes for ``plan`` trained on
    ``model`` (unquantized, possibly on the meta device: only its tensors' names and shapes are read) in ``dtype``
    with ``backend``'s quantization; ``spec``: the model's spec, whose GGUF file gives the metadata. The headers are
    laid out by gguf's own writer (tokenizer and all), each tensor priced by `linear_type` / `layer_gguf_bytes`.
    Refuses, as the export does, a base without its GGUF file or of another architecture."""
    import gguf

    from .architecture import decoder_layers
    from .memory import ModelShapes

    source = check_exportable(spec)
    arch = source.arch
    config = model.config
    tmap = _name_map(arch, config.num_hidden_layers)
    dense = dense_type(torch.finfo(dtype).bits // 8)
    has_codes = exposes_codes(backend.module_class)
    shapes = ModelShapes.from_model(model)
    linears = {f"{layer_name}.{s.name}.weight": (i, s)
               for i, (layer_name, _) in enumerate(decoder_layers(model)) for s in shapes.layers[i]}
    model_writer, adapter_writer = _writer(None, arch), _adapter_writer(None, arch)
    source.write(model_writer)
    types: dict[str, int] = {}
    others = 0  # padded bytes of the tensors outside the decoder linears
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        name, shape = _gguf_name(tmap, key), list(tensor.shape)
        if key in linears:
            layer, s = linears[key]
            kind = linear_type(plan.layers[layer].of(s.name).bits, plan.group_size_of(layer, s.name), s.in_features,
                               has_codes=has_codes, dense=dense)
            types[kind] = types.get(kind, 0) + 1
        else:
            kind = "F32" if tensor.dim() < 2 else dense
            others += _padded(tensor_bytes(kind, tensor.numel()))
        model_writer.add_tensor_info(name, shape, np.float32, tensor_bytes(kind, tensor.numel()),
                                     raw_dtype=gguf.GGMLQuantizationType[kind])
    for name, data in source.tensors().items():
        others += _padded(tensor_bytes("F32", data.size))
        model_writer.add_tensor_info(name, list(data.shape), np.float32, data.nbytes)
    from .memory import adapted_shapes

    for i, (layer_name, _) in enumerate(decoder_layers(model)):
        for s in adapted_shapes(shapes.layers[i], plan.target_modules):
            rank = plan.layers[i].of(s.name).rank
            target = _gguf_name(tmap, f"{layer_name}.{s.name}.weight")
            for suffix, shape in (("lora_a", [rank, s.in_features]), ("lora_b", [s.out_features, rank])):
                adapter_writer.add_tensor_info(f"{target}.{suffix}", shape, np.float32, 4 * shape[0] * shape[1],
                                               raw_dtype=gguf.GGMLQuantizationType.F32)
    _add_file_type(model_writer, types)
    headers = _header_bytes(model_writer), _header_bytes(adapter_writer)
    layer_bytes = [layer_gguf_bytes(layer, choice, group_size=plan.group_size, target_modules=plan.target_modules,
                                    dense=dense, has_codes=has_codes)
                   for layer, choice in zip(shapes.layers, plan.layers)]
    return GGUFSize(model_bytes=headers[0] + others + sum(m for m, _ in layer_bytes),
                    adapter_bytes=headers[1] + sum(a for _, a in layer_bytes),
                    fixed_bytes=sum(headers) + others, types=types)


def check_gguf_budget(spec: str | None, *, dora: bool = False) -> None:
    """Refuse a ``gguf:`` budget on files the export cannot write: a base it refuses, or DoRA adapters."""
    from .errors import BudgetError

    if dora:
        raise BudgetError("a gguf: budget is on the files llama.cpp runs, and llama.cpp has no DoRA adapters",
                          "drop --dora, or give a budget on the stored model (4bit, 350MB)")
    try:
        check_exportable(spec)
    except ArtifactError as e:
        raise BudgetError(f"a gguf: budget is on the files `export --gguf` writes, which cannot be written for this "
                          f"model: {e.cause}", "give a budget on the stored model (4bit, 350MB), or load the base "
                          "from its .gguf file") from None


def gguf_budget_size(model, plan, backend, *, spec: str | None, dtype: torch.dtype) -> GGUFSize:
    """`predict_gguf` where a ``gguf:`` budget needs it (refused as `check_gguf_budget` refuses)."""
    check_gguf_budget(spec, dora=plan.dora)
    return predict_gguf(model, plan, backend, spec=spec, dtype=dtype)


def _header_bytes(writer) -> int:
    """Bytes before the first tensor's data in the file ``writer`` would write (its key-values and tensor infos,
    padded), measured by writing them."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qradaptor-gguf-") as tmp, _quiet_writer():
        writer.write_header_to_file(Path(tmp) / "header.gguf")
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        size = writer.fout[0].tell()
        writer.close()
    return _padded(size)
