"""The export format: a finished training run as a directory that stock ``transformers`` + ``peft`` load, and
loading it back with qradaptor on its packed mixed-precision base (``qradaptor export``, which writes it, is in
``qradaptor.commands.export``).

``OUT/`` (written under a temporary name and renamed into place when complete):

- ``config.json``, ``model.safetensors``, tokenizer files: the **dequantized** base, i.e. exactly the weights the
  quantized layers compute with, as a plain checkpoint. Stock transformers cannot load a mixed-bit HQQ
  checkpoint (its HQQ integration has no loader for pre-quantized weights, and ``HqqConfig`` keys its settings
  by module tag, not layer index), so this is what ``AutoModelForCausalLM.from_pretrained(OUT)`` reads.
- ``adapter/``: the trained LoRA adapter as PEFT writes it (``PeftModel.from_pretrained(model, OUT/"adapter")``).
  Adapters on routed experts (``Plan.expert_adapters``) are trained one per expert on the split experts, and are
  written here as PEFT's ``target_parameters`` adapters on the base's 3-D expert tensors (`write_stock_adapter`);
  ``qradaptor/adapter/`` then keeps them as trained, for `load`, which splits the experts again.
- ``qradaptor/quantized.safetensors``: the packed base, each quantized module's backend tensors under
  ``<module name>.<tensor>``, with JSON metadata naming the backend, compute dtype, bits and group size per
  module. `load` uses it, so the reloaded model holds exactly the bytes the memory model predicts.
- ``qradaptor/export.json`` (source run, config, memory, metrics, versions, and ``files``: every path the export
  wrote), ``plan.json``, ``README.md`` (model card), and with ``merge`` ``merged/``: the adapter folded into the
  dequantized base, a plain model.

An existing ``OUT`` is replaced only when it is an export whose ``files`` list covers everything in it: a
directory holding anything the tool did not write (the user's notes, an export made before the list existed) is
refused, never deleted. Loading checks the packed file against the plan and the model: every module the plan
quantizes present, no other, each with the model's shape, the plan's bits and the export's dtype.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import resolve_device
from .errors import ArtifactError
from .models import LoadedModel, quiet_peft_wrapping
from .plan import Plan
from .rundir import RunConfig

log = logging.getLogger("qradaptor")

PACKED_DIR = "qradaptor"
PACKED_FILE = "quantized.safetensors"
EXPORT_FILE = "export.json"
MERGED_DIR = "merged"
OWN_ADAPTER_DIR = "adapter"  # under PACKED_DIR: the adapter as trained, where `adapter/` is in another layout
PACKED_FORMAT = "qradaptor-packed/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_adapter(model, adapter_dir: Path):
    """``PeftModel.from_pretrained``, from safetensors only: PEFT falls back to unpickling adapter_model.bin,
    and unpickling a file can run any code in it."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_model.safetensors").is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise ArtifactError(
                f"{adapter_dir} holds its adapter only as a pickled adapter_model.bin; qradaptor loads safetensors "
                "only, because unpickling a file can run any code in it",
                f"if you trust the file, convert it once: python -c \"import torch, safetensors.torch as st; "
                f"st.save_file(torch.load('{adapter_dir}/adapter_model.bin'), "
                f"'{adapter_dir}/adapter_model.safetensors')\"")
        raise ArtifactError(f"{adapter_dir} has no adapter_model.safetensors",
                            "export the training run again (qradaptor export RUN --to OUT)")
    from .architecture import model_expert_holders

    # routed experts split into per-expert linears get no adapters, as in training (`plan.lora_config`)
    holders = model_expert_holders(model)
    if not holders:
        with quiet_peft_wrapping():
            return PeftModel.from_pretrained(model, adapter_dir)
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(adapter_dir)
    config.exclude_modules = holders
    with quiet_peft_wrapping():
        return PeftModel.from_pretrained(model, adapter_dir, config=config)


@contextlib.contextmanager
def quiet_pattern_warnings():
    """PEFT warns that rank/alpha patterns of ``target_parameters`` adapters "were ignored": it checks them against
    the targeted modules only, but applies them (the expert adapters' shapes follow them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        yield


def write_stock_adapter(tuned, plan: Plan, dense_base, target: Path) -> None:
    """Write ``tuned``'s adapter (a PeftModel on split experts with adapters on them) to ``target`` as stock PEFT
    loads it on ``dense_base``, the same model with its routed experts 3-D tensors again: the other modules' adapters
    as they are, and each expert projection's per-expert adapters as one ``target_parameters`` adapter (PEFT's
    ``ParamWrapper``, which reshapes lora_A to experts × r × in and lora_B to out × r × experts: so A is the
    experts' A stacked, B their B interleaved). ``dense_base`` is left as it was."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from .architecture import decoder_layers, expert_holders, linear_names

    own, base = tuned.peft_config["default"], tuned.get_base_model()
    ranks: dict[str, tuple[int, float]] = {}  # module (or expert projection) → its rank and alpha, as trained
    holders = set()
    for layer_name, layer in decoder_layers(base):
        experts = set(expert_holders(layer))
        for name, module in layer.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            holder = name.rpartition(".")[0]
            if holder in experts:
                holders.add(holder)
                name = holder
            ranks[f"{layer_name}.{name}"] = (module.r["default"], module.lora_alpha["default"])
    differ = {re.escape(k): v for k, v in ranks.items() if v != (own.r, own.lora_alpha)}
    config = LoraConfig(
        r=own.r, lora_alpha=own.lora_alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=list(plan.targets_in(linear_names(decoder_layers(dense_base)[0][1]))),
        target_parameters=sorted(holders), rank_pattern={k: r for k, (r, _) in differ.items()},
        alpha_pattern={k: a for k, (_, a) in differ.items()})
    with quiet_pattern_warnings(), quiet_peft_wrapping():
        stock = get_peft_model(dense_base, config)
    wanted = get_peft_model_state_dict(stock)
    set_peft_model_state_dict(stock, {k: v for k, v in get_peft_model_state_dict(tuned).items() if k in wanted})
    with torch.no_grad():
        for name, module in stock.get_base_model().named_modules():
            if isinstance(module, ParamWrapper):
                owner = re.sub(r"(\.base_layer)+$", "", name)  # nested: one wrapper per targeted tensor
                holder = base.get_submodule(f"{owner}.{module.parameter_name}")
                experts = [holder._modules[str(e)] for e in range(len(holder))]
                module.lora_A["default"].weight.copy_(torch.cat([m.lora_A["default"].weight for m in experts]))
                module.lora_B["default"].weight.copy_(
                    torch.stack([m.lora_B["default"].weight for m in experts], dim=-1).flatten(1))
    stock.save_pretrained(target, safe_serialization=True)
    stock.unload()


# ---------------------------------------------------------------------------------------------- kinds
def artifact_kind(path: str | os.PathLike) -> str | None:
    """``"export"`` for an exported directory, ``"run"`` for a training run directory, else None."""
    from .rundir import RUN_FILE

    path = Path(path)
    if (path / PACKED_DIR / PACKED_FILE).is_file() or (path / PACKED_DIR / EXPORT_FILE).is_file():
        return "export"
    if (path / RUN_FILE).is_file():
        return "run"
    return None


def finished_run(run_dir: Path) -> dict:
    from .rundir import ADAPTER_DIR, read_run

    if not run_dir.exists():
        raise ArtifactError(f"training run not found: {run_dir}",
                            "pass the --out directory of `qradaptor train` (or an exported directory)")
    run = read_run(run_dir)
    if run is None:
        raise ArtifactError(f"{run_dir} is not a training run (it has no run.json)",
                            f"train first: qradaptor train --plan PLAN --out {run_dir}")
    if run.get("status") != "finished" or not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise ArtifactError(f"the run in {run_dir} has not finished training (no trained adapter yet)",
                            f"finish it with: qradaptor train --out {run_dir} --resume")
    return run


@dataclass(eq=False)
class TrainedModel:
    """A finished training run in memory: its quantized base with the trained adapter (a ``PeftModel``)."""

    model: object
    tokenizer: object
    plan: Plan
    run: dict  # the run's run.json

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.run["config"])


def open_run(run_dir: str | os.PathLike, base: LoadedModel | None = None, *, device=None,
             dtype: torch.dtype | str | None = None) -> TrainedModel:
    """The finished training run in ``run_dir``, its base quantized per its plan and its adapter loaded (eval
    mode). ``base``: the run's model already loaded (it must have the run's weights); it is converted and
    quantized in place, so it is used up. Without it the model is loaded from the run's spec. ``device``:
    where the model is quantized and lives (default: auto). ``dtype``: of the base, scales and zeros (default:
    the run's; another converts the trained model's: see `load`)."""
    from .backends import get_backend, is_quantized
    from .models import convert_weights, load_base, model_fingerprint
    from .quantize import quantize_model, set_child
    from .rundir import ADAPTER_DIR

    run_dir = Path(run_dir)
    run = finished_run(run_dir)
    config = RunConfig.from_dict(run["config"])
    own = DTYPES[config.dtype]  # what the run trained in: quantized in it, the model is exactly the trained one
    plan = Plan.from_dict(run["plan"], source=str(run_dir / "run.json"))
    loaded = load_base(base or config.model, dtype=own)
    if model_fingerprint(loaded.model) != run.get("model_fingerprint"):
        raise ArtifactError(f"the base model {config.model} is not the one {run_dir} was trained on "
                            "(its weights changed: the model fingerprint differs)",
                            "restore the original model at that path, or retrain")
    quantized = quantize_model(loaded.model, plan, get_backend(config.backend, compute_dtype=own), inplace=True,
                               device=resolve_device(device))
    target = _target_dtype(dtype, own)
    if target != own:  # each quantized layer rebuilt from its state, as a load of an export in that dtype does
        convert_weights(quantized, target)
        quant = get_backend(config.backend, compute_dtype=target)
        for name, module in list(quantized.named_modules()):
            if is_quantized(module):
                set_child(quantized, name, quant.from_state(module.state(), name))
    tuned = load_adapter(quantized, run_dir / ADAPTER_DIR)
    tuned.eval()
    return TrainedModel(tuned, loaded.tokenizer, plan, run)


# ---------------------------------------------------------------------------------------------- load
def _target_dtype(asked: torch.dtype | str | None, own: torch.dtype) -> torch.dtype:
    """The dtype a load builds the model in: ``asked`` (a torch dtype or its name), or the artifact's ``own``."""
    if asked is None:
        return own
    if isinstance(asked, str) and asked in DTYPES:
        return DTYPES[asked]
    if asked in DTYPES.values():
        return asked
    raise ArtifactError(f"cannot load in dtype {asked!r}", f"use one of {', '.join(DTYPES)} (or None: the artifact's)")


def load_artifact(path: str | os.PathLike, *, device=None, dtype: torch.dtype | str | None = None):
    """``(model, tokenizer)`` from an exported directory (packed mixed-precision base + adapter) or a finished
    training run directory. The model is a ``PeftModel`` in eval mode whose quantized layers hold the packed
    codes, so `qradaptor.memory.measured_bytes` of it equals the memory model's prediction. ``device``: where it
    is built (``auto``: a CUDA GPU when PyTorch sees one, else the CPU). ``dtype``: see `load`."""
    model, tokenizer, _ = open_artifact(path, device=device, dtype=dtype)
    return model, tokenizer


def open_artifact(path: str | os.PathLike, *, device=None, dtype: torch.dtype | str | None = None):
    """``(model, tokenizer, plan)``: `load_artifact`'s model and tokenizer, and the artifact's `Plan`."""
    path = Path(path)
    kind = artifact_kind(path) if path.is_dir() else None
    if kind is None:
        if not path.exists():
            raise ArtifactError(f"artifact not found: {path}",
                                "pass the directory written by `qradaptor export` (or `qradaptor train --out`)")
        raise ArtifactError(f"{path} is not a qradaptor artifact (no {PACKED_DIR}/{PACKED_FILE} and no run.json)",
                            "pass the directory written by `qradaptor export` (or `qradaptor train --out`)")
    device = resolve_device(device)
    if kind == "run":
        trained = open_run(path, device=device, dtype=dtype)
        return trained.model, trained.tokenizer, trained.plan
    return _load_export(path, device, dtype)


def load(path: str | os.PathLike, *, device=None, dtype: torch.dtype | str | None = None):
    """The trained model in ``path`` (see `load_artifact`, which also returns the tokenizer), on ``device``
    (``auto``: a CUDA GPU when PyTorch sees one, else the CPU). ``dtype`` (``torch.float32``, ``torch.bfloat16`` or
    their names): of the base weights, scales and zeros, and so of the computation (default: the export's own, in
    which the model is exactly the trained one, as stock transformers + peft load it with ``dtype="auto"``); the
    LoRA adapters stay float32. A bf16 export loaded in float32 widens its scales and zeros exactly and forms the
    weights (q − z)·s in fp32, so it differs from the bf16-trained model by the rounding of those products."""
    return load_artifact(path, device=device, dtype=dtype)[0]


def _load_export(path: Path, device: torch.device, asked: torch.dtype | str | None = None):
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .backends import get_backend
    from .errors import QRAdaptorError
    from .models import _quiet_transformers
    from .plan import UNQUANTIZED_BITS
    from .architecture import split_experts
    from .quantize import decoder_layers, layer_linears, set_child

    packed = path / PACKED_DIR / PACKED_FILE
    adapter = path / PACKED_DIR / OWN_ADAPTER_DIR  # adapters on split experts, as trained
    adapter = adapter if adapter.is_dir() else path / "adapter"
    for needed in (packed, path / "config.json", adapter / "adapter_config.json", path / "plan.json"):
        if not needed.is_file():
            raise ArtifactError(f"the export in {path} is incomplete: {needed.relative_to(path)} is missing",
                                "export the training run again (qradaptor export RUN --to OUT)")
    fix = ("the file is damaged or was changed after export: export the training run again "
           "(qradaptor export RUN --to OUT)")
    try:
        with safe_open(packed, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != PACKED_FORMAT:
                raise ArtifactError(f"{packed} has format {meta.get('format')!r}, expected {PACKED_FORMAT!r}",
                                    "load it with the qradaptor version that wrote it, or export again")
            modules = json.loads(meta["modules"])
            keys = set(f.keys())
            states = {}
            for name, info in modules.items():
                lacking = [k for k in info["tensors"] if f"{name}.{k}" not in keys]
                if lacking:  # e.g. tensors renamed: never fall back to the dense layer
                    raise ArtifactError(f"{packed} lacks the tensor {name}.{lacking[0]} that its module list names",
                                        fix)
                # on the device at once: a backend builds its module where its tensors are
                states[name] = {key: f.get_tensor(f"{name}.{key}").to(device) for key in info["tensors"]}
            unlisted = sorted(keys - {f"{n}.{k}" for n, info in modules.items() for k in info["tensors"]})
            if unlisted:
                raise ArtifactError(f"{packed} holds tensors its module list does not name ({', '.join(unlisted[:3])})",
                                    fix)
    except ArtifactError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        # truncated or garbage bytes, a header that does not cover the data, malformed metadata
        raise ArtifactError(f"{packed} is unreadable ({e})", fix) from None
    dtype = DTYPES.get(meta.get("compute_dtype"))
    if dtype is None:
        raise ArtifactError(f"{packed} names an unknown compute dtype {meta.get('compute_dtype')!r}", fix)
    target = _target_dtype(asked, dtype)
    try:
        quant = get_backend(meta.get("backend"), compute_dtype=target)
    except QRAdaptorError as e:
        raise ArtifactError(f"{packed}: {e.cause}", fix) from None
    plan = Plan.load(path / "plan.json")
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=target, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        pickled = " (only pickled .bin weights, which qradaptor does not load)" if any(path.glob("*.bin")) else ""
        raise ArtifactError(f"the export's base weights, {path}/model.safetensors, are missing or unreadable{pickled}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}",
                            "export the training run again (qradaptor export RUN --to OUT)") from None
    split_experts(model)  # as the run quantized them: one linear per routed expert
    plan.check_model(model, source=str(path / "plan.json"))
    # What the plan quantizes in this model: exactly these modules must be in the packed file.
    expected: dict[str, tuple[torch.nn.Linear, int]] = {}
    for index, (layer_name, layer) in enumerate(decoder_layers(model)):
        for sub, linear in layer_linears(layer):
            if (bits := plan.layers[index].of(sub).bits) != UNQUANTIZED_BITS:
                expected[f"{layer_name}.{sub}"] = (linear, bits)
    unknown, missing = sorted(set(states) - set(expected)), sorted(set(expected) - set(states))
    if unknown or missing:
        what = [f"modules the plan does not quantize in this model ({', '.join(unknown[:3])})"] if unknown else []
        what += [f"no packed weights for {', '.join(missing[:3])}"] if missing else []
        raise ArtifactError(f"{packed} does not match the model and plan.json: it has {'; and '.join(what)} "
                            "(were module names changed?)", fix)
    for name, state in states.items():
        linear, bits = expected[name]
        for key in ("scale", "zero", "bias"):  # stored in the compute dtype: another dtype means a changed header
            if key in state and state[key].dtype != dtype:
                raise ArtifactError(f"{packed}: {name}.{key} is stored as {state[key].dtype}, but the export "
                                    f"computes in {dtype}", fix)
        try:
            module = quant.from_state(state, name)
            stored_bits = int(state["nbits"])
        except QRAdaptorError as e:  # its cause names the module
            raise ArtifactError(f"{packed}: {e.cause}", e.fix) from None
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ArtifactError(f"{packed}: module {name}: its tensors are malformed ({e})", fix) from None
        shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if shape != (linear.out_features, linear.in_features):
            raise ArtifactError(f"{packed}: module {name} is stored as {shape[0]}x{shape[1]}, but the model's "
                                f"is {linear.out_features}x{linear.in_features}", fix)
        if stored_bits != bits or modules[name].get("bits") != bits:
            raise ArtifactError(f"{packed}: module {name} is stored at {stored_bits} bits, but plan.json gives its "
                                f"layer {bits}", fix)
        set_child(model, name, module)
    model.to(device)  # the rest: embeddings, norms, 16-bit layers
    model.requires_grad_(False)
    tuned = load_adapter(model, adapter)
    tuned.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tuned, tokenizer, plan


# ---------------------------------------------------------------------------------------------- model card
STOCK_LOADER = '''import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

out = "{out}"
tokenizer = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # the dequantized base
model = PeftModel.from_pretrained(model, f"{{out}}/adapter").eval()
'''


def model_card(info: dict, name: str) -> str:
    from .memory import format_bytes

    mem, metrics, cfg, plan = info["memory"], info["metrics"], info["config"], info["plan"]
    val = metrics.get("validation") or {}
    rows = "\n".join(f"| {i} | {layer['bits']} | {layer['rank']} |" for i, layer in enumerate(plan["layers"]))
    val_line = (f"- validation loss {val['loss']:.4f}, perplexity {val['perplexity']:.2f} over {val['tokens']} tokens\n"
                if val else "- no validation split was evaluated\n")
    final = metrics.get("final_train_loss")
    return f"""---
library_name: peft
tags: [qradaptor, lora, mixed-precision, {mem['backend']}]
---

# {name}

A LoRA fine-tune of `{cfg['model']}` on a mixed-precision quantized base, made with qradaptor: every
decoder layer has its own bit-width and LoRA rank.

## Plan

`{mem['plan']}`, group size {plan['group_size']}, alpha = {plan['alpha_ratio']} × rank, targets
{', '.join(plan['target_modules'])}; embeddings, norms and `lm_head` unquantized.

| layer | bits | rank |
|---|---|---|
{rows}

## Memory

- predicted {format_bytes(mem['predicted_bytes'])} ({mem['predicted_bytes']} bytes), measured after reload
  {format_bytes(mem['measured_bytes'])} ({mem['measured_bytes']} bytes), with the `{mem['backend']}` backend in
  {cfg['dtype']}
- quantized linears {format_bytes(mem['quantized_bytes'])} ({mem['avg_bits']:.3f} bits per weight with scales
  and zeros, {mem['code_bits']:.3f} code bits), LoRA adapters {format_bytes(mem['lora_bytes'])} (fp32, counted),
  everything else {format_bytes(mem['other_bytes'])}

## Training and metrics

- {metrics.get('steps')} steps, batch {cfg['batch_size']}×{cfg['grad_accum']} of {cfg['seq_len']} tokens,
  lr {cfg['lr']}, seed {cfg['seed']}, data `{cfg['data']}`
- final training loss {final if final is None else f'{final:.4f}'}
{val_line}
## Loading

With transformers + peft only (the base here is the *dequantized* weights: stock transformers cannot load a
mixed-bit HQQ checkpoint, so `model.safetensors` holds exactly the values the quantized layers compute with):

```python
{STOCK_LOADER.format(out=name)}```

With qradaptor, on the packed mixed-precision base (`qradaptor/quantized.safetensors`, the memory above):

```python
import qradaptor
model = qradaptor.load("{name}")
```
""" + (f"""
`merged/` holds the adapter folded into the dequantized base: `AutoModelForCausalLM.from_pretrained("{name}/merged")`.
""" if info.get("merged") else "")
