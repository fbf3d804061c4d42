"""``qradaptor train``: the full fine-tune of a plan, in a run directory it owns (``rundir.py`` holds the layout).

The run directory records the resolved settings, the plan, fingerprints of the model and data, and checkpoints;
an interrupted run continues from its last checkpoint with ``resume=True`` and computes the losses of an
uninterrupted one. The training loop itself (`qradaptor.train.train`) takes a model and token blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..device import PeakMemory, resolve_device
from ..errors import ArtifactError, TrainingError
from ..precision import DTYPE_CHOICES, DTYPES, DtypeChoice, default_dtype
from ..evaluate import evaluate_loss
from ..memory import release_free_memory
from ..io import AtomicDirectory, atomic_write_json, check_output_dir
from ..models import LoadedModel, load_base
from ..rundir import (ADAPTER_DIR, ADAPTER_INITS, CALIBRATED_INITS, CHECKPOINTS_DIR, LOG_FILE, METRICS_FILE, PLAN_FILE,
                      RUN_FILE, RUN_FORMAT, RunConfig, package_versions, read_run)
from ..train import (STATE_JSON, TrainConfig, TrainResult, TrainState, load_checkpoint, save_checkpoint,
                     train)

log = logging.getLogger("qradaptor")



@dataclass
class RunResult:
    out: Path
    config: RunConfig
    train: TrainResult
    validation: dict | None  # final held-out loss: {"loss", "perplexity", "tokens"}
    metrics: dict
    resumed_from: int = 0  # the step the run continued from (0: a fresh start)
    model: object = field(default=None, repr=False)  # the trained PEFT model, in memory


def _spec(value) -> str:
    """A model/data spec as stored: existing paths absolute (so the run dir works from anywhere)."""
    path = Path(str(value)).expanduser()
    return str(path.resolve()) if path.exists() else str(value)


def _loop_config(config: RunConfig) -> TrainConfig:
    return TrainConfig(steps=config.steps, batch_size=config.batch_size, grad_accum=config.grad_accum, lr=config.lr,
                       warmup_steps=config.warmup_steps, min_lr_ratio=config.min_lr_ratio,
                       weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, seed=config.seed,
                       eval_every=config.eval_every if config.eval_blocks else 0,
                       gradient_checkpointing=config.gradient_checkpointing)


def _resolve(given: dict, saved: dict | None) -> RunConfig:
    """Settings from the caller (None = not given) over the saved run's (resume) or the defaults (new run)."""
    if given.get("steps") is not None and given.get("epochs") is not None:
        raise ArtifactError("both steps and epochs were given", "give either --steps N or --epochs E")
    for key in ("model", "data"):
        if given.get(key) is not None:
            given[key] = _spec(given[key])
    if saved is None:
        values = RunConfig().to_dict()
        values.update({k: v for k, v in given.items() if v is not None})
        if values["steps"] is None and values["epochs"] is None:
            values["epochs"] = 1.0
        config = RunConfig(**values)
    else:
        changed = []
        for key, value in given.items():
            if value is None or key in _RESUME_MAY_CHANGE or (key, value) == ("dtype", "auto"):
                continue
            if key == "steps" and saved.get("epochs") is not None and value == saved.get("steps"):
                continue  # the same number of steps, written as --steps this time
            if saved.get(key) != value:
                changed.append(f"{key} {saved.get(key)!r} → {value!r}")
        if changed:
            raise ArtifactError(
                "cannot resume with changed settings: " + ", ".join(changed),
                "resume with the settings the run started with (or none: they are read from run.json), "
                "or start a new run in another --out directory",
            )
        try:
            config = RunConfig.from_dict(saved)
        except TypeError as e:  # keys this version does not know: a damaged or foreign run.json
            raise ArtifactError(f"the run's {RUN_FILE} has settings this qradaptor does not know ({e})",
                                "resume it with the qradaptor version that wrote it, or start a new run") from None
        for key in _RESUME_MAY_CHANGE:
            if given.get(key) is not None:
                setattr(config, key, given[key])
    for key in ("batch_size", "grad_accum", "seq_len"):
        if getattr(config, key) < 1:
            raise ArtifactError(f"{key} must be at least 1, got {getattr(config, key)}", f"pass a positive {key}")
    if config.steps is not None and config.steps < 1:
        raise ArtifactError(f"steps must be at least 1, got {config.steps}", "pass --steps 1 or more")
    if config.epochs is not None and not config.epochs > 0:
        raise ArtifactError(f"epochs must be positive, got {config.epochs}", "pass e.g. --epochs 1")
    if config.dtype not in DTYPE_CHOICES:
        raise ArtifactError(f"unknown dtype {config.dtype!r}", f"use one of {', '.join(DTYPE_CHOICES)}")
    if config.adapter_init not in ADAPTER_INITS:
        raise ArtifactError(f"unknown adapter start {config.adapter_init!r}",
                            f"use --adapter-init {' or '.join(ADAPTER_INITS)}")
    if type(config.start_tokens) is not int or config.start_tokens < 1:
        raise ArtifactError(f"start_tokens must be a whole number of at least 1, got {config.start_tokens!r}",
                            f"give --start-tokens such a number (default {RunConfig.start_tokens})")
    _check_numbers(config)
    return config


_CLI_FLAGS = frozenset({"lr", "warmup_steps", "eval_blocks", "eval_every", "checkpoint_every", "max_train_blocks"})


def _check_numbers(config: RunConfig) -> None:
    """Settings that would fail or train to garbage after the run directory is written are refused before."""
    def finite(name: str, low: float, *, above: bool = False, high: float = math.inf) -> None:
        value = getattr(config, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and (value > low if above else value >= low) and value <= high
        if not ok:
            bound = f"{'above' if above else 'at least'} {low:g}" + ("" if high == math.inf else f" and at most {high:g}")
            how = f"--{name.replace('_', '-')}" if name in _CLI_FLAGS else name  # the rest are library settings
            raise ArtifactError(f"{name} must be a finite number {bound}, got {value!r}",
                                f"give {how} such a value (default {getattr(RunConfig, name)!r})")

    finite("lr", 0, above=True)
    finite("warmup_steps", 0)
    finite("min_lr_ratio", 0, high=1)
    finite("weight_decay", 0)
    finite("max_grad_norm", 0)
    finite("eval_blocks", 0)
    for name, low in (("eval_every", 0), ("checkpoint_every", 1), ("max_train_blocks", 1)):
        if getattr(config, name) is not None:
            finite(name, low)


#: Settings a resume may change: they do not change what is computed.
_RESUME_MAY_CHANGE = frozenset({"checkpoint_every", "gradient_checkpointing", "device"})


def _checkpoints(out: Path) -> list[Path]:
    root = out / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_JSON).is_file())


def _read_snapshot(directory: str | Path) -> tuple[Path, dict]:
    """A search's kept prefix run (`FineTuneFitness.trajectory(keep=...)`) and what it is the beginning of."""
    import json

    from ..search.fitness import SNAPSHOT_FILE, SNAPSHOT_FORMAT

    directory = Path(directory)
    fix = (f"point --init-from at a directory a search kept for this plan (it holds {SNAPSHOT_FILE} and the "
           "run's checkpoint), or train without --init-from")
    try:
        info = json.loads((directory / SNAPSHOT_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{directory} holds no kept search run ({SNAPSHOT_FILE} is missing)", fix) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{directory / SNAPSHOT_FILE} is unreadable ({e})", fix) from None
    if not isinstance(info, dict) or info.get("format") != SNAPSHOT_FORMAT:
        raise ArtifactError(f"{directory / SNAPSHOT_FILE} is not a kept search run of this qradaptor version "
                            f"(format {info.get('format') if isinstance(info, dict) else None!r})", fix)
    if not (directory / STATE_JSON).is_file():
        raise ArtifactError(f"{directory} lacks the run's checkpoint ({STATE_JSON})", fix)
    return directory, info


class KeptRunMismatch(ArtifactError):
    """An --init-from run that is the beginning of another fine-tune (`qradaptor run` then trains from step 0)."""


def _check_snapshot(directory: Path, info: dict, this_run: dict) -> None:
    """Refuse to continue a kept run that is not the beginning of this one, naming what differs."""
    from ..search.fitness import SNAPSHOT_DEFAULTS

    differ = [k for k, v in this_run.items() if k != "train_config" and info.get(k, SNAPSHOT_DEFAULTS.get(k)) != v]
    kept = info.get("train_config") or {}
    # what is computed does not depend on these: evaluation and activation checkpointing
    same = ("eval_every", "gradient_checkpointing")
    differ += [f"{k} ({kept.get(k)!r} there, {v!r} here)" for k, v in this_run["train_config"].items()
               if k not in same and kept.get(k) != v]
    if differ:
        raise KeptRunMismatch(f"the run kept in {directory} is the beginning of another fine-tune: "
                            f"{', '.join(differ)} differ",
                            f"train with that run's settings ({directory / 'snapshot.json'}) or without --init-from")


def _save_checkpoint(model, out: Path, step: int, state: TrainState) -> Path:
    target = save_checkpoint(model, out / CHECKPOINTS_DIR / f"step-{step:06d}", state)
    for old in _checkpoints(out):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _check_budget(budget, memory, estimate, shapes, plan, quant, base, config: RunConfig, dtype) -> None:
    from ..errors import BudgetError
    from ..memory import check_training_budget, format_bytes, parse_budget, parse_gguf_budget, parse_training_budget

    train_budget = parse_training_budget(budget)
    if train_budget is not None:
        check_training_budget(estimate, train_budget, shapes, plan, quant, base.config, dtype=dtype,
                              grad_accum=config.grad_accum)
        return
    gguf_budget = parse_gguf_budget(budget)
    if gguf_budget is not None:
        from ..gguf_export import gguf_budget_size

        size = gguf_budget_size(base, plan, quant, spec=config.model, dtype=dtype).total_bytes
        if size > gguf_budget:
            raise BudgetError(f"the plan's GGUF files take {format_bytes(size)}, over the budget "
                              f"{format_bytes(gguf_budget)}", "search a plan within it (qradaptor search --budget "
                              f"gguf:...) or give a larger one")
        return
    stored = parse_budget(budget, shapes, quant, group_size=plan.group_size, base_dtype=dtype,
                          target_modules=plan.target_modules, dora=plan.dora,
                          expert_adapters=plan.expert_adapters)
    if memory.total_bytes > stored:
        raise BudgetError(f"the plan takes {format_bytes(memory.total_bytes)}, over the budget {format_bytes(stored)}",
                          "search a plan within the budget (qradaptor search --budget ...) or give a larger one")


def _check_run_dir(out: Path, saved: dict | None, resume: bool) -> None:
    """A new run needs an empty --out; a resume needs an unfinished run there."""
    if resume:
        if saved is None:
            raise ArtifactError(f"nothing to resume: {out} holds no training run ({RUN_FILE} is missing)",
                                "drop --resume to start a new run there, or pass the --out of the interrupted run")
        if saved.get("status") == "finished":
            raise ArtifactError(f"the run in {out} has already finished",
                                f"export it (qradaptor export {out} --to OUT) or train into another --out directory")
    elif saved is not None:
        raise ArtifactError(f"{out} already holds a training run",
                            "pass --resume to continue it, or choose another --out directory")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out} exists and is not empty", "choose a new or empty --out directory")


def _plan_to_train(plan, saved: dict | None, out: Path, target_modules=None, dora: bool | None = None,
                   expert_adapters: bool | None = None):
    """The plan given, or the saved one on resume, with ``target_modules``, ``dora`` and ``expert_adapters`` in
    place of its own where given; a different plan (or targets) on resume is a changed setting."""
    from ..plan import Plan

    if plan is None:
        if saved is None:
            raise ArtifactError("no plan given", "pass --plan PLAN.json (one {bits, rank} per decoder layer)")
        plan_obj = Plan.from_dict(saved["plan"], source=str(out / PLAN_FILE))
    else:
        plan_obj = plan if isinstance(plan, Plan) else (Plan.from_dict(plan) if isinstance(plan, dict) else Plan.load(plan))
    if target_modules is not None:
        targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
        plan_obj = dataclasses.replace(plan_obj, target_modules=targets)
    if dora is not None:
        plan_obj = dataclasses.replace(plan_obj, dora=dora)
    if expert_adapters is not None:
        plan_obj = dataclasses.replace(plan_obj, expert_adapters=expert_adapters)
    if saved is not None and plan_obj.to_dict() != saved["plan"]:
        before = Plan.from_dict(saved["plan"])
        what = (f"target modules {list(before.target_modules)} → {list(plan_obj.target_modules)}"
                if before.layers == plan_obj.layers and before.target_modules != plan_obj.target_modules
                else f"dora {before.dora} → {plan_obj.dora}" if before.dora != plan_obj.dora
                else f"expert_adapters {before.expert_adapters} → {plan_obj.expert_adapters}"
                if before.expert_adapters != plan_obj.expert_adapters
                else f"{before.describe()} → {plan_obj.describe()}")
        raise ArtifactError(f"cannot resume with changed settings: the plan differs from {out / PLAN_FILE} ({what})",
                            "resume with the run's own plan (or omit --plan, --target-modules, --dora and "
                            "--expert-adapters), or start "
                            "a new run elsewhere")
    return plan_obj


@dataclass
class _Prepared:
    """A fine-tune ready to start, built before anything is written: the quantized model with its adapters, its
    data, what it will hold, and where its dtype came from."""

    config: RunConfig
    plan: object  # Plan
    model: object  # the PeftModel to train
    train_blocks: object
    eval_blocks: object | None
    memory: object  # MemoryReport of the plan
    estimate: object  # TrainingMemory
    backend: str
    device: object  # torch.device
    model_fingerprint: str
    data_fingerprint: str
    dtype_choice: dict
    adapter_start: dict | None = None  # how the adapters were fitted (None: PEFT's zero start, or a resumed run)


def _choose_dtype(config: RunConfig, device, init_from, snapshot: dict | None) -> dict:
    """Resolve ``auto`` (a run continuing a search's kept run takes that run's dtype) and say why."""
    if config.dtype != "auto":
        return {"dtype": config.dtype, "reason": "given", "device": str(device)}
    if init_from is not None and snapshot.get("dtype") in DTYPES:
        choice = DtypeChoice(snapshot["dtype"], f"the dtype of the search's run it continues ({init_from})",
                             str(device))
    else:
        choice = default_dtype(device)
    config.dtype = choice.dtype  # recorded resolved: a resume (on any machine) computes in the same dtype
    return choice.to_dict()


def _prepare(config: RunConfig, plan, loaded: LoadedModel | None, saved: dict | None, *, budget, init_from,
             snapshot: dict | None, fresh: bool) -> _Prepared:
    """Load, check and quantize everything the fine-tune needs; whatever the user's input gets wrong is refused
    here, before the run directory is touched."""
    from ..backends import get_backend
    from ..data import data_fingerprint, load_blocks
    from ..memory import ModelShapes, predict, training_memory
    from ..models import model_fingerprint
    from ..quantize import add_adapters, quantize_model

    device = resolve_device(config.device)
    dtype_choice = _choose_dtype(config, device, init_from, snapshot)
    dtype = DTYPES[config.dtype]
    loaded = load_base(loaded or config.model, dtype=dtype)
    base, tokenizer = loaded.model, loaded.tokenizer
    plan.check_model(base, source="the plan")
    quant = get_backend(config.backend, compute_dtype=dtype)
    fingerprint = model_fingerprint(base)
    if saved is not None and saved.get("model_fingerprint") != fingerprint:
        raise ArtifactError(f"cannot resume: the weights of {config.model} changed since the run started "
                            "(model fingerprint differs)", "resume with the same model, or start a new run")
    train_blocks = load_blocks(config.data, tokenizer, "train", seq_len=config.seq_len,
                               max_blocks=config.max_train_blocks, model=base)
    eval_blocks = (load_blocks(config.data, tokenizer, "validation", seq_len=config.seq_len,
                               max_blocks=config.eval_blocks, model=base) if config.eval_blocks else None)
    data_fp = data_fingerprint(config.data, "train", config.seq_len, max_blocks=config.max_train_blocks)
    if saved is not None and saved.get("data_fingerprint") != data_fp:
        raise ArtifactError(f"cannot resume: the training data {config.data} changed since the run started",
                            "resume with the same data, or start a new run")
    if config.steps is None:
        config.steps = max(1, math.ceil(config.epochs * len(train_blocks) / (config.batch_size * config.grad_accum)))
    if config.eval_every is None:
        config.eval_every = max(1, math.ceil(config.steps / 5)) if config.eval_blocks else 0
    if config.checkpoint_every is None:
        config.checkpoint_every = max(1, math.ceil(config.steps / 10))
    shapes = ModelShapes.from_model(base)
    memory = predict(shapes, plan, quant)
    estimate = training_memory(shapes, plan, quant, base.config, batch_size=config.batch_size,
                               seq_len=config.seq_len, dtype=dtype, checkpointing=config.gradient_checkpointing,
                               device=device)
    if budget is not None:
        _check_budget(budget, memory, estimate, shapes, plan, quant, base, config, dtype)
    if init_from is not None:
        _check_snapshot(init_from, snapshot, {
            "plan": plan.to_dict(), "model_fingerprint": fingerprint, "dtype": config.dtype,
            "backend": config.backend, "seq_len": config.seq_len, "data_fingerprint": data_fp,
            "adapter_init": config.adapter_init, "start_tokens": config.start_tokens,
            "train_config": _loop_config(config).to_dict()})
    # The adapter start is fitted on the dense model, before quantizing it in place uses it up; ``fresh``: the run
    # starts at step 0 (a resumed or continued run loads its adapters).
    factors, start, cache = {}, None, None
    if config.adapter_init != "zero" and fresh:
        factors, start, cache = _fit_start(config, base, plan, quant, train_blocks)
    # In place: each dense linear moves to the device, is quantized there and is freed as its quantized version
    # replaces it (bits and shapes are checked first).
    tuned = add_adapters(quantize_model(base, plan, quant, cache=cache, dtype=dtype, inplace=True, device=device),
                         plan, seed=config.seed)
    if factors:
        from ..adapter_init import apply_start

        apply_start(tuned, factors)
    return _Prepared(config, plan, tuned, train_blocks, eval_blocks, memory, estimate, quant.name, device,
                     fingerprint, data_fp, dtype_choice, start)


def _fit_start(config: RunConfig, base, plan, quant, train_blocks):
    """The adapters' start (`qradaptor.adapter_init`) fitted on the dense ``base``, what to record of it, and the
    quantization cache it filled (the codes it fitted against: quantizing the model then reuses them)."""
    from ..adapter_init import AdapterStart, calibration_subset
    from ..backends import QuantCache

    began = time.perf_counter()
    cache = QuantCache(quant)
    calibration = calibration_subset(train_blocks, config.start_tokens)
    factors = AdapterStart(base, config.adapter_init, cache, blocks=calibration,
                           max_rank=plan.max_rank).factors(plan)
    start = {"method": config.adapter_init, "modules": len(factors), "seconds": round(time.perf_counter() - began, 2),
             "calibration_tokens": int(calibration.input_ids.numel()) if config.adapter_init in CALIBRATED_INITS
             else 0}
    return factors, start, cache


def _log_plan(say, job: _Prepared, reason: str) -> None:
    from ..memory import format_bytes

    config, estimate = job.config, job.estimate
    say("plan %s on %s: %s predicted (%.2f avg bits, adapters included)", job.plan.describe(), config.model,
        format_bytes(job.memory.total_bytes), job.memory.avg_bits)
    say("computing in %s on %s (%s)", config.dtype, job.device, reason)
    say("predicted training peak: %s (runtime %s, model %s, LoRA gradients %s, AdamW state %s, activations "
        "%s, loss %s, freed memory the heap keeps %s%s) for batches of %d×%d tokens, gradient checkpointing %s",
        format_bytes(estimate.peak_bytes), format_bytes(estimate.runtime_bytes),
        format_bytes(estimate.weights_bytes), format_bytes(estimate.gradient_bytes),
        format_bytes(estimate.optimizer_bytes), format_bytes(estimate.activation_bytes),
        format_bytes(estimate.loss_bytes), format_bytes(estimate.allocator_bytes),
        f" with {estimate.allocator} allocation" if estimate.allocator else "", config.batch_size,
        config.seq_len, "on" if config.gradient_checkpointing else "off")
    if estimate.allocator == "glibc":
        say("PyTorch allocates with glibc's defaults in this process (THP_MEM_ALLOC_ENABLE=0, or PyTorch "
            "allocated before qradaptor was imported), whose heap keeps more freed memory while training; "
            "import qradaptor before making tensors, or set THP_MEM_ALLOC_ENABLE=1, for its huge-page path")


def _start(out: Path, job: _Prepared, saved: dict | None, init_from: Path | None,
           say) -> tuple[dict, TrainState | None]:
    """The run's record (new, or the saved one on resume) and the state training starts from: the last checkpoint
    on resume, the search's kept run with ``init_from``, else None (step 0)."""
    config = job.config
    if saved is None:
        run = {"format": RUN_FORMAT, "status": "running", "config": config.to_dict(), "plan": job.plan.to_dict(),
               "seed": config.seed, "model_fingerprint": job.model_fingerprint,
               "data_fingerprint": job.data_fingerprint, "versions": package_versions(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed": [], "dtype_choice": job.dtype_choice}
        job.plan.save(out / PLAN_FILE)
    else:
        run = saved
    _log_plan(say, job, (run.get("dtype_choice") or {}).get("reason", "as the run recorded"))
    state = None
    if saved is not None:
        checkpoints = _checkpoints(out)
        # a run started from a search's kept run, interrupted before its first checkpoint, starts there again
        start = checkpoints[-1] if checkpoints else (saved.get("initialised_from") or {}).get("path")
        if start:
            state = load_checkpoint(job.model, start)
            say("resuming from %s (step %d of %d)", start, state.step, config.steps)
        else:
            say("no checkpoint was written before the interruption: starting again from step 0")
        run.setdefault("resumed", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                              "from_step": 0 if state is None else state.step,
                                              "versions": package_versions()})
    elif init_from is not None:
        state = load_checkpoint(job.model, init_from)
        run["initialised_from"] = {"path": str(init_from), "step": state.step}
        say("continuing the search's run of this plan from step %d of %d (%s): those steps are not trained "
            "again", state.step, config.steps, init_from)
    if job.adapter_start:
        start = job.adapter_start
        say("adapters start fitted to the quantization error (%s, %d modules%s) in %.1f s", start["method"],
            start["modules"], f", {start['calibration_tokens']} calibration tokens" if start["calibration_tokens"]
            else "", start["seconds"])
        run["adapter_start"] = start
    run["training_estimate"] = job.estimate.to_dict()
    atomic_write_json(out / RUN_FILE, run)
    return run, state


def _finish(out: Path, job: _Prepared, result: TrainResult, training_peak: dict, run: dict, progress: bool,
            say) -> tuple[dict | None, dict]:
    """After the last step: the final validation, the adapter, metrics.json and the finished record."""
    from ..memory import measured_bytes

    validation = None
    if job.eval_blocks is not None:
        validation = evaluate_loss(job.model, job.eval_blocks, progress=progress, desc="validation").to_dict()
    with AtomicDirectory(out / ADAPTER_DIR) as tmp:
        job.model.save_pretrained(tmp)
    metrics = {
        "steps": job.config.steps, "train_losses": result.losses, "final_train_loss": result.final_loss,
        "evals": [list(e) for e in result.evals], "validation": validation,
        "memory": {**job.memory.to_dict(), "measured_bytes": measured_bytes(job.model), "backend": job.backend,
                   "plan": job.plan.describe()},
        "training_estimate": job.estimate.to_dict(), "training_peak": training_peak,
        "seconds_this_session": result.seconds,
    }
    atomic_write_json(out / METRICS_FILE, metrics)
    run["status"] = "finished"
    run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(out / RUN_FILE, run)
    if validation:
        say("final validation loss %.4f (perplexity %.2f) over %d tokens", validation["loss"],
            validation["perplexity"], validation["tokens"])
    return validation, metrics


def _fine_tune(out: Path, job: _Prepared, saved: dict | None, init_from: Path | None, progress: bool) -> RunResult:
    """Write the run directory and train, checkpointing as it goes; a run that fails before its first checkpoint
    leaves the directory as it was."""
    from ..memory import format_bytes

    config, tuned = job.config, job.model
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        logfile = open(out / LOG_FILE, "a", encoding="utf-8")
    except OSError as e:
        raise ArtifactError(f"cannot write the run directory {out}: {e.strerror or e}",
                            "pass an --out directory you can write to") from None

    def say(fmt: str, *args) -> None:
        """Log (shown unless --quiet) and always append to the run's train.log."""
        log.info(fmt, *args)
        logfile.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {fmt % args}\n")
        logfile.flush()

    def on_step(step: int, result: TrainResult, snapshot) -> None:
        if result.evals and result.evals[-1][0] == step:
            logfile.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {step}: validation loss "
                          f"{result.evals[-1][1]:.4f}\n")
        if step % config.checkpoint_every == 0 or step == config.steps:
            where = _save_checkpoint(tuned, out, step, snapshot())
            logfile.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {step}: loss {result.losses[-1]:.4f}, "
                          f"checkpoint {where.name}\n")
            logfile.flush()

    try:
        run, state = _start(out, job, saved, init_from, say)
        say("training %d steps of %d×%d tokens (seed %d) → %s", config.steps,
            config.batch_size * config.grad_accum, config.seq_len, config.seed, out)
        release_free_memory()  # what building the model freed does not count towards the training peak
        peak = PeakMemory(job.device).start()
        result = train(tuned, job.train_blocks, _loop_config(config), eval_blocks=job.eval_blocks,
                       progress=progress, resume=state, on_step=on_step)
        training_peak = {"measured_bytes": peak.bytes(), "what": peak.describe(), "device": str(job.device),
                         "predicted_bytes": job.estimate.peak_bytes}
        if training_peak["measured_bytes"] is not None:
            say("training peak: %s measured (%s), %s predicted", format_bytes(training_peak["measured_bytes"]),
                training_peak["what"], format_bytes(training_peak["predicted_bytes"]))
        if result.evals:
            log.info("validation loss by step: %s", ", ".join(f"{s}: {v:.4f}" for s, v in result.evals))
        validation, metrics = _finish(out, job, result, training_peak, run, progress, say)
        return RunResult(out=out, config=config, train=result, validation=validation, metrics=metrics,
                         resumed_from=0 if state is None else state.step, model=tuned)
    except Exception as e:
        logfile.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} failed: {e}\n")
        kept = _checkpoints(out)
        if saved is None and not kept:
            # Nothing worth resuming: leave the directory as it was, so the same --out can be used again.
            logfile.close()
            _remove_new_run(out, created)
        if isinstance(e, TrainingError):
            where = (f"; the last good checkpoint, {kept[-1].name}, is kept in {out / CHECKPOINTS_DIR}" if kept
                     else "; nothing was kept")
            raise TrainingError(e.cause + where, e.fix.replace("train again", "train again into a new --out")
                                if kept else e.fix) from None
        raise
    finally:
        logfile.close()


def train_plan(out: str | Path, *, plan=None, model: str | LoadedModel | None = None, data: str | None = None,
               budget: str | int | None = None, resume: bool = False, progress: bool = True,
               init_from: str | Path | None = None, target_modules: tuple[str, ...] | None = None,
               dora: bool | None = None, expert_adapters: bool | None = None, **settings) -> RunResult:
    """What ``qradaptor train`` runs: the full fine-tune of ``plan`` on the quantized base, into ``out``.

    ``settings`` are `RunConfig` fields (``steps``, ``epochs``, ``batch_size``, ``lr``, ``dtype``, ...). Those
    not given (or None) take their defaults (new run) or the saved run's values (``resume``); a resume
    that names a different value is refused, naming the setting. Checkpoints are written every
    ``checkpoint_every`` steps; an interrupted run continues from the latest with ``resume=True`` and
    computes exactly the losses of an uninterrupted run. ``budget`` (``train:1.5GiB`` on the predicted training
    peak, or a budget on the stored model as `parse_budget` reads it) refuses, before anything is written, a
    plan and batch that exceed it, naming a batch size or checkpointing setting that fits.

    ``model`` is a spec, or a `LoadedModel` (its spec is what run.json records): that one is converted to the
    run's dtype and quantized in place, so the caller's dense model is used up (one copy in memory, not two).

    ``init_from``: a search's kept prefix run of this plan (`FineTuneFitness.trajectory(keep=...)`), which a new
    run continues instead of starting over: its steps are not trained twice, and the result is exactly that of
    a run from step 0. It must be the beginning of this very run (plan, model, data, schedule, dtype), else the
    run is refused, naming what differs; with ``dtype="auto"`` (the default) the run takes the kept run's dtype.

    ``target_modules``: the linears of each decoder layer that get adapters, in place of the plan's own; ``dora``:
    DoRA adapters (True) or plain LoRA (False) in place of the plan's ``dora``; ``expert_adapters``: adapters on
    the routed experts (True) or not (False) in place of the plan's own.
    """
    known = set(RunConfig.__dataclass_fields__) - {"model", "data"}
    if set(settings) - known:
        raise TypeError(f"train_plan() got unexpected settings {sorted(set(settings) - known)}; settings are "
                        f"RunConfig fields: {sorted(known)}")
    loaded = model if isinstance(model, LoadedModel) else None
    model = loaded.spec if loaded is not None else model
    out = check_output_dir(out, ArtifactError)
    snapshot = None
    if init_from is not None:
        if resume:
            raise ArtifactError("--init-from starts a new run from a search's kept run; a resumed run continues from "
                                "its own checkpoints", "drop --init-from when resuming")
        init_from, snapshot = _read_snapshot(init_from)
    saved = read_run(out)
    _check_run_dir(out, saved, resume)
    if budget is not None:
        from ..memory import parse_gguf_budget, parse_training_budget

        # a malformed train:SIZE or gguf:SIZE fails before the model and the data load
        parse_training_budget(budget), parse_gguf_budget(budget)
    config = _resolve({**settings, "model": model, "data": data}, None if saved is None else saved["config"])
    plan_obj = _plan_to_train(plan, saved, out, target_modules, dora, expert_adapters)
    # a new run (or one interrupted before its first checkpoint) starts its adapters; the others load theirs
    fresh = init_from is None and not (saved is not None and (_checkpoints(out) or saved.get("initialised_from")))
    job = _prepare(config, plan_obj, loaded, saved, budget=budget, init_from=init_from, snapshot=snapshot,
                   fresh=fresh)
    return _fine_tune(out, job, saved, init_from, progress)


def _remove_new_run(out: Path, created: bool) -> None:
    """Delete what a fresh run wrote before failing (and the directory, if the run made it)."""
    for name in (RUN_FILE, PLAN_FILE, LOG_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()
