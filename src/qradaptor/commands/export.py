"""``qradaptor export``: write a finished training run as a directory that stock ``transformers`` + ``peft`` load
(the layout is described in ``qradaptor.export``), replacing only an earlier export of the tool's own."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..errors import ArtifactError
from ..export import (DTYPES, EXPORT_FILE, MERGED_DIR, OWN_ADAPTER_DIR, PACKED_DIR, PACKED_FILE, PACKED_FORMAT,
                      TrainedModel, finished_run, load_adapter, model_card, open_run, quiet_pattern_warnings,
                      write_stock_adapter)
from ..io import AtomicDirectory, atomic_save_safetensors, atomic_write_json, atomic_write_text

log = logging.getLogger("qradaptor")


def _entries(root: Path) -> set[str]:
    """Every file and directory under ``root`` (relative, ``/``-separated; directories end in ``/``)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        found.update((rel / d).as_posix() + "/" for d in dirnames)
        found.update((rel / f).as_posix() for f in filenames)
    return found


def export_manifest(path: str | os.PathLike) -> set[str] | None:
    """The paths an export in ``path`` wrote (its ``files`` list), or None when ``path`` holds no export that
    lists them (not an export, a damaged ``export.json``, or an export from before the list existed)."""
    try:
        info = json.loads((Path(path) / PACKED_DIR / EXPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != PACKED_FORMAT:
        return None
    files = info.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def _check_replaceable(out: Path) -> None:
    """Refuse an ``out`` that holds anything an earlier export did not write: replacing it would delete it."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory", "choose another --to path")
    present = _entries(out)
    if not present:
        return
    written = export_manifest(out)
    if written is None:
        raise ArtifactError(f"{out} is not empty and is not an earlier export (it has no readable "
                            f"{PACKED_DIR}/{EXPORT_FILE} listing the files an export wrote): replacing it could "
                            "destroy files that are not the tool's",
                            "choose a new or empty --to directory (or delete that one yourself)")
    foreign = sorted(present - written)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ArtifactError(f"{out} holds an earlier export plus files it did not write ({shown}): replacing it "
                            "would delete them", f"move them out of {out}, or choose another --to directory")


def _run_metrics(path: Path) -> dict:
    """The training run's metrics.json ({} when there is none), refusing a damaged one with a way out."""
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        metrics = e
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{path} is damaged ({metrics if isinstance(metrics, Exception) else 'not a JSON object'})",
                            "restore it, or delete it to export without the training metrics in the model card")
    return metrics


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, merge: bool = False, gguf: bool = False,
           trained: TrainedModel | None = None) -> dict:
    """What ``qradaptor export RUN --to OUT [--merge] [--gguf]`` runs. Returns a summary (paths, memory, metrics).
    ``gguf``: also ``OUT/model.gguf``, ``OUT/adapter.gguf`` and an Ollama ``Modelfile`` for llama.cpp
    (`qradaptor.gguf_export`). ``trained``: the run already in memory (`open_run`, or the model `train_plan`
    returned); left unchanged."""
    from ..backends import get_backend, is_quantized
    from ..memory import ModelShapes, measured_bytes, predict
    from ..quantize import dequantized_model
    from ..rundir import ADAPTER_DIR, METRICS_FILE, package_versions

    run_dir, out = Path(run_dir), Path(out)
    run = finished_run(run_dir)
    if out.resolve() == run_dir.resolve():
        raise ArtifactError("the export target is the run directory itself", "choose another --to directory")
    _check_replaceable(out)
    metrics = _run_metrics(run_dir / METRICS_FILE)  # before the slow part
    if gguf:
        from ..gguf_export import check_exportable

        if (run.get("plan") or {}).get("dora"):
            raise ArtifactError("llama.cpp applies LoRA adapters only, and this run trained DoRA adapters (a magnitude "
                                "per output row that a LoRA pair cannot hold)",
                                "export without --gguf (transformers + PEFT load DoRA), or train with --no-dora")
        check_exportable(run["config"].get("model"))  # before the slow part: refused, nothing written

    trained = trained or open_run(run_dir)
    tuned, tokenizer, plan, config = trained.model, trained.tokenizer, trained.plan, trained.config
    quant = get_backend(config.backend, compute_dtype=DTYPES[config.dtype])
    # The dense base holding exactly the dequantized weights (what stock transformers loads), and the packed states.
    base = dequantized_model(tuned, DTYPES[config.dtype])
    packed: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for name, module in tuned.get_base_model().named_modules():
        if not is_quantized(module) or ".lora_" in name:
            continue
        prefix = name.removesuffix(".base_layer")  # PEFT wrapped it; the name in the plain model
        state = module.state()
        for key, tensor in state.items():
            packed[f"{prefix}.{key}"] = tensor.detach().contiguous().clone()
        modules[prefix] = {"bits": module.bits, "group_size": module.group_size, "tensors": sorted(state)}
    if not modules and plan.bit_widths != (16,):
        raise RuntimeError("no quantized module found in the run's model")  # a bug, not a user error

    shapes = ModelShapes.from_model(base)
    memory = {**predict(shapes, plan, quant).to_dict(), "measured_bytes": measured_bytes(tuned),
              "backend": quant.name, "plan": plan.describe()}
    info = {
        "format": PACKED_FORMAT, "source_run": str(run_dir.resolve()), "config": run["config"],
        "model_fingerprint": run.get("model_fingerprint"), "plan": plan.to_dict(), "memory": memory,
        "metrics": {k: metrics.get(k) for k in ("steps", "final_train_loss", "validation", "evals")},
        "merged": merge, "versions": package_versions(),
    }
    metadata = {"format": PACKED_FORMAT, "backend": quant.name, "compute_dtype": config.dtype,
                "group_size": str(plan.group_size), "modules": json.dumps(modules, sort_keys=True)}

    from ..models import _quiet_transformers

    try:
        with AtomicDirectory(out) as tmp, _quiet_transformers():
            base.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if plan.expert_adapters:  # per-expert adapters as PEFT's on the 3-D expert tensors; as trained for `load`
                write_stock_adapter(tuned, plan, base, tmp / "adapter")
                shutil.copytree(run_dir / ADAPTER_DIR, tmp / PACKED_DIR / OWN_ADAPTER_DIR)
            else:
                shutil.copytree(run_dir / ADAPTER_DIR, tmp / "adapter")
            _name_base(tmp / "adapter" / "adapter_config.json", out)
            plan.save(tmp / "plan.json")
            atomic_save_safetensors(tmp / PACKED_DIR / PACKED_FILE, packed, metadata=metadata)
            atomic_write_text(tmp / "README.md", model_card(info, out.name))
            if merge:
                _write_merged(base, tokenizer, tmp / "adapter", tmp / MERGED_DIR)
            if gguf:
                from ..gguf_export import write_gguf

                info["gguf"] = write_gguf(trained, tmp, config.model, merged=merge).to_dict()
            # written last, listing everything (itself included): what a later export may replace
            info["files"] = sorted(_entries(tmp) | {f"{PACKED_DIR}/{EXPORT_FILE}"})
            atomic_write_json(tmp / PACKED_DIR / EXPORT_FILE, info)
    except OSError as e:
        raise ArtifactError(f"writing the export to {out} failed: {e.strerror or e}",
                            "free disk space (or fix the permissions) and export again; nothing was left at "
                            f"{out} (an earlier export there, if any, is intact)") from None
    log.info("exported %s → %s (%s)", run_dir, out, plan.describe())
    return {"out": str(out), "memory": memory, "metrics": info["metrics"],
            "merged": str(out / MERGED_DIR) if merge else None, "gguf": info.get("gguf")}


def _name_base(adapter_config: Path, out: Path) -> None:
    """The adapter's base is the export's dequantized model (``out``, where the directory is renamed to), not the
    model the run was trained from: PEFT's auto classes (``AutoPeftModelForCausalLM.from_pretrained(OUT/adapter)``)
    load the base it names, and the path typed at `train` would give them the unquantized model, or nothing where
    that path does not exist. Absolute, because PEFT resolves it from the current directory."""
    config = json.loads(adapter_config.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(out.resolve())
    if config.get("exclude_modules"):  # split routed experts (no adapters): 3-D tensors again in the export's base
        config["exclude_modules"] = None
    atomic_write_json(adapter_config, config)


def _write_merged(dense_base, tokenizer, adapter_dir: Path, target: Path) -> None:
    """The adapter folded into the dequantized base: a plain model that ``from_pretrained`` loads alone."""
    with quiet_pattern_warnings():
        merged = load_adapter(dense_base, adapter_dir).merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
