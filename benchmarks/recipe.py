"""Which peak learning rate and warm-up should `train` and `run` default to? (issue #29: recipe defaults)

The frontier's recipe (100 steps of 4×128) measured every row best at lr 2e-3–3e-3, not at the default 3e-4
(results/learning_rate.md, ablation-lr*.md), and the adapter start best at 3e-3 with a 20-step warm-up. A default
`run` trains longer: 200 steps of 4 blocks of 256 tokens (`--steps`: another length, e.g. 89, the default
`train`'s one epoch of the default data). This benchmark trains what the default `run --budget 4bit` chose there
(uniform 4-bit r16, results/run_stages.json) at that shape, at several (learning rate, warm-up) pairs, and reports
the held-out loss:

    start       uniform 4-bit r16, the adapter start `train` uses by default (what `run --budget 4bit` trains)
    qlora4-r16  the same with PEFT's zero start: QLoRA as run today       (--rows; the gap's floor)
    lora16      LoRA r16 on the unquantized base, zero start              (--rows; the gap's ceiling)

    .venv/bin/python benchmarks/recipe.py                                   # start at 3e-4:5, 2e-3:5, 3e-3:20
    .venv/bin/python benchmarks/recipe.py --recipes 1e-3:5 --rows start,qlora4-r16,lora16
    .venv/bin/python benchmarks/recipe.py --recipes 3e-4:5 --seeds 3        # seeds 0-2 of each row asked for
    .venv/bin/python benchmarks/recipe.py --corpus code --recipes 3e-4:5 --rows start,qlora4-r16,lora16
    .venv/bin/python benchmarks/recipe.py --smoke                           # a tiny random model: the script runs

Each 200-step final is about 20 min in bf16 on 2 cores with native bf16 matmuls (89 steps took 492 s). Finals go to the frontier's store and ledger (benchmarks/work/finals,
results/finals.json; learning rate and warm-up are part of their key), so a rerun with more recipes or rows trains
only what is new. Writes benchmarks/results/recipe.{json,md} (recipe-steps<N> at another length, recipe-code on the
second corpus, benchmarks/corpus.py's Python source; every recipe and row the ledger holds at this shape is reported,
not only those asked for this time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402
from benchmarks.frontier import (FINAL_EVAL_BLOCKS, FINALS, REFERENCE, children_in_process, final_key,  # noqa: E402
                                 final_spec, gap_recovered, held_out_current, ledger_path, read_ledger, recipe,
                                 run_final, train_dtype)
from benchmarks.learning_rate import percent  # noqa: E402

ROWS = ("start", REFERENCE, "lora16")
DEFAULT_RECIPES = ((3e-4, 5), (2e-3, 5), (3e-3, 20))  # today's default first: what the others are judged against


def _recipes(text: str) -> list[tuple[float, int]]:
    """``LR:WARMUP[,LR:WARMUP]`` → [(lr, warm-up steps)], in the order given, without repeats."""
    out = []
    for item in text.split(","):
        lr, sep, warmup = item.strip().partition(":")
        try:
            pair = (float(lr), int(warmup))
        except ValueError:
            pair = None
        if not sep or pair is None or not pair[0] > 0 or pair[1] < 0:
            raise argparse.ArgumentTypeError(f"{item!r}: give LR:WARMUP pairs, e.g. 3e-3:20 (a positive rate, a "
                                             "count of warm-up steps)")
        out.append(pair)
    return list(dict.fromkeys(out))


def _rows(text: str) -> list[str]:
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise argparse.ArgumentTypeError(f"unknown rows {unknown or text!r}: choose among {', '.join(ROWS)}")
    return list(dict.fromkeys(rows))


def run_shape(steps: int | None, *, smoke: bool) -> dict:
    """The training shape of a default `run`: its final fine-tune's steps (``steps`` for another length, e.g. the
    default `train`'s one epoch) and block length, `RunConfig`'s batch size. A smoke run keeps its blocks short."""
    import inspect

    from qradaptor.commands.run import run
    from qradaptor.rundir import RunConfig

    defaults = {k: v.default for k, v in inspect.signature(run).parameters.items()}
    config = RunConfig()
    return {"steps": steps or defaults["steps"], "seq_len": 32 if smoke else defaults["seq_len"],
            "batch_size": config.batch_size, "adapter_init": config.adapter_init,
            "run_steps": defaults["steps"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", type=_recipes, default=list(DEFAULT_RECIPES), metavar="LR:WARMUP,...",
                        help="the (peak learning rate, warm-up steps) pairs, trained in this order (default "
                             + ",".join(f"{lr:g}:{w}" for lr, w in DEFAULT_RECIPES) + ")")
    parser.add_argument("--rows", type=_rows, default=["start"], metavar="ROW,...",
                        help=f"what to train at each recipe, among {', '.join(ROWS)} (default: start)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="optimizer steps of each fine-tune (default: a default `run`'s, 200; the default `train` "
                             "trains one epoch, 89 steps on the default data)")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train seeds 0..N-1 of each row at each recipe (default 1; every seed the ledger holds is "
                             "reported)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="every row's training dtype (default: `train`'s on this CPU)")
    parser.add_argument("--corpus", choices=("pydoc", "code"), default="pydoc",
                        help="the data: the default corpus (pydoc topics) or benchmarks/corpus.py's Python source, "
                             "built on first use (default pydoc)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model and data: checks the script runs")
    parser.add_argument("--work", default=None, help="with --smoke: where its model, finals and results go (default: "
                                                     "a temp dir)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps: a positive count, not {args.steps}")
    if args.seeds < 1:
        parser.error(f"--seeds: a positive count, not {args.seeds}")
    if args.smoke and args.corpus != "pydoc":
        parser.error("--smoke trains on its own tiny data: leave out --corpus")
    began = time.perf_counter()
    from qradaptor.plan import Plan

    model = data = source = None
    store = FINALS
    work = None
    if args.smoke:
        from benchmarks.search import smoke_model

        work = Path(args.work or tempfile.mkdtemp(prefix="qradaptor-recipe-"))
        children_in_process()
        model, data = smoke_model(work)
        store = work / "finals"
    elif args.corpus == "code":
        from benchmarks.corpus import code_corpus_data

        data, source = code_corpus_data()
    shape = run_shape(args.steps or (4 if args.smoke else None), smoke=args.smoke)  # a smoke run only checks the script
    dtype = args.dtype or train_dtype()
    from qradaptor.models import load_config

    L = load_config(model).num_hidden_layers  # the plans' layer count: the weights are not needed
    plans = {"start": Plan.uniform(L, 4, 16), REFERENCE: Plan.uniform(L, 4, 16), "lora16": Plan.uniform(L, 16, 16)}
    settings = {k: shape[k] for k in ("steps", "seq_len", "batch_size", "adapter_init")}
    for lr, warmup in args.recipes:
        for name in args.rows:
            row_settings = recipe(name, {**settings, "lr": lr, "warmup_steps": warmup})
            for seed in range(args.seeds):
                label = f"recipe {name} lr {lr:g} warm-up {warmup}" + (f" seed {seed}" if seed else "")
                final = run_final(store, label, plans[name], row_settings, model, data, seed=seed, dtype=dtype)
                print(f"recipe: {name} at lr {lr:g}, {warmup} warm-up steps, seed {seed}: {final['loss']:.4f}",
                      flush=True)
    # every row at this shape the ledger holds: a run that asked for one recipe reports the earlier ones too
    rows = ledger_rows(store, plans, settings, model, data, dtype)
    payload = {"settings": {**shape, "dtype": dtype, "smoke": args.smoke, "model": model or "smollm2-135m",
                            "data": data or "pydoc-topics", "corpus": args.corpus, "corpus_source": source},
               "rows": rows, "summary": summarise(rows), "seconds": time.perf_counter() - began,
               "environment": environment()}
    md = report(payload) + f"\nCPU: {describe_cpu(payload['environment'])}.\n"
    name = "recipe" + ("-code" if args.corpus == "code" else "")
    name += "" if args.smoke or shape["steps"] == shape["run_steps"] else f"-steps{shape['steps']}"
    write_results(f"{name}-smoke" if args.smoke else name, payload, md,
                  directory=work if args.smoke else RESULTS)  # smoke results measure nothing: they stay out of results/
    print(md)
    return 0


def ledger_rows(store: Path, plans: dict, settings: dict, model, data, dtype: str) -> list[dict]:
    """The finals of ``plans`` at this shape (``dtype``) in ``store``'s ledger, at every learning rate, warm-up and
    seed it holds one for: one row per plan, rate and warm-up (means over its seeds), in the order learning rate,
    warm-up, row."""
    from qradaptor.rundir import RunConfig

    finals = read_ledger(ledger_path(store))
    shape = [e for e in finals.values() if all(e.get(k) == settings[k] for k in ("steps", "seq_len", "batch_size"))]
    pairs = {(e["lr"], e.get("warmup_steps", RunConfig.warmup_steps)) for e in shape}
    seeds = sorted({e["seed"] for e in shape})
    rows = []
    for lr, warmup in pairs:
        for name, plan in plans.items():
            found = {}
            for seed in seeds:
                spec = final_spec(plan, recipe(name, {**settings, "lr": lr, "warmup_steps": warmup}), model, data,
                                  seed=seed, dtype=dtype)
                entry = finals.get(final_key(spec))
                if entry is not None and held_out_current(entry["result"], spec):  # else judged on other text
                    found[seed] = entry["result"]
            if found:
                mean = lambda key: (sum(r[key] for r in found.values()) / len(found)  # noqa: E731
                                    if all(r.get(key) is not None for r in found.values()) else None)
                losses = [r["loss"] for r in found.values()]
                rows.append({"name": name, "lr": lr, "warmup_steps": warmup, "plan": plan.describe(),
                             # a 16-bit layer's adapters start at zero whatever the setting (nothing to fit)
                             "adapter_init": "zero" if name == "lora16" else spec.get("adapter_init", "zero"),
                             "seeds": sorted(found),
                             "seed_losses": losses, "loss": mean("loss"), "loss_spread": max(losses) - min(losses),
                             "validation_loss": mean("validation_loss"),
                             "validation_all_loss": mean("validation_all_loss"),
                             "final_train_loss": mean("final_train_loss"), "memory_bytes": mean("memory_bytes"),
                             "train_seconds": mean("train_seconds")})
    return sorted(rows, key=lambda r: (r["lr"], r["warmup_steps"], ROWS.index(r["name"])))


def summarise(rows: list[dict]) -> dict:
    """Per row: its best recipe; the start's change from today's default recipe; the gap recovered at each recipe
    where all three rows ran, and with each row at its best recipe."""
    from qradaptor.rundir import RunConfig

    loss = {(r["name"], r["lr"], r["warmup_steps"]): r["loss"] for r in rows}
    best = {}
    for name in ROWS:
        mine = [(lr, w) for (n, lr, w) in loss if n == name]
        if mine:
            lr, w = min(mine, key=lambda k: loss[(name, *k)])
            best[name] = {"lr": lr, "warmup_steps": w, "loss": loss[name, lr, w]}
    today = loss.get(("start", RunConfig.lr, RunConfig.warmup_steps))
    gain = {f"{lr:g}:{w}": today - v for (n, lr, w), v in loss.items() if n == "start"} if today is not None else {}
    # the gap from the seeds all three rows ran (a row's extra seeds would move its mean alone)
    by_seed = {(r["name"], r["lr"], r["warmup_steps"]): dict(zip(r["seeds"], r["seed_losses"])) for r in rows}

    def shared_gap(three: list[tuple]) -> tuple[float | None, list[int]]:
        shared = sorted(set.intersection(*(set(by_seed.get(k, ())) for k in three)))
        means = [sum(by_seed[k][seed] for seed in shared) / len(shared) for k in three] if shared else None
        return (gap_recovered(*means) if means else None), shared

    at, at_seeds = {}, {}
    for (_, lr, w) in (k for k in loss if k[0] == "start"):
        gap, shared = shared_gap([(REFERENCE, lr, w), ("start", lr, w), ("lora16", lr, w)])
        if shared:
            at[f"{lr:g}:{w}"], at_seeds[f"{lr:g}:{w}"] = gap, shared
    at_best = [(name, best[name]["lr"], best[name]["warmup_steps"]) for name in (REFERENCE, "start", "lora16")
               if name in best]
    tuned = shared_gap(at_best)[0] if len(at_best) == 3 else None
    return {"best": best, "default": {"lr": RunConfig.lr, "warmup_steps": RunConfig.warmup_steps, "loss": today},
            "gain_over_default": gain, "recovered_at": at, "recovered_seeds": at_seeds, "recovered_tuned": tuned}


def gap_cell(summary: dict, row: dict) -> str:
    """The gap recovered at ``row``'s recipe, naming the seeds it is of where the three rows ran different ones."""
    key = f"{row['lr']:g}:{row['warmup_steps']}"
    shared = summary["recovered_seeds"].get(key)
    cell = percent(summary["recovered_at"].get(key))
    if cell and shared != row["seeds"]:
        cell += f" (seed{'s' * (len(shared) > 1)} {','.join(map(str, shared))}: those all three rows ran)"
    return cell


def report(payload: dict) -> str:
    s, rows, summary = payload["settings"], payload["rows"], payload["summary"]
    title = "a tiny random model (smoke)" if s["smoke"] else "SmolLM2-135M-Instruct"
    code = s.get("corpus") == "code"
    if code:
        title += ", on Python source"
    gain = summary["gain_over_default"]

    table = [[r["name"], f"{r['lr']:g}", r["warmup_steps"], r["plan"], r["adapter_init"],
              ",".join(map(str, r["seeds"])),
              f"{r['loss']:.4f}" + (f" ± {r['loss_spread'] / 2:.4f}" if len(r["seeds"]) > 1 else ""),
              "" if r["validation_loss"] is None else f"{r['validation_loss']:.4f}",
              "" if r["validation_all_loss"] is None else f"{r['validation_all_loss']:.4f}",
              f"{gain[key]:+.4f}" if r["name"] == "start" and (key := f"{r['lr']:g}:{r['warmup_steps']}") in gain
              else "", gap_cell(summary, r) if r["name"] == "start" else "",
              f"{r['train_seconds']:.0f}"] for r in rows]
    d = summary["default"]
    lines = [f"- Best recipe measured for {name}: lr {b['lr']:g}, {b['warmup_steps']} warm-up steps ({b['loss']:.4f})"
             for name, b in summary["best"].items()]
    if d["loss"] is not None and "start" in summary["best"]:
        b = summary["best"]["start"]
        lines.append(f"- The start at today's default recipe (lr {d['lr']:g}, {d['warmup_steps']} warm-up steps) ends "
                     f"{d['loss']:.4f}; at its best recipe measured {d['loss'] - b['loss']:.4f} lower.")
    if summary["recovered_tuned"] is not None:
        lines.append(f"- With each row at its best recipe measured the start recovers "
                     f"{percent(summary['recovered_tuned'])} of the gap from {REFERENCE} to lora16.")
    return (f"# The default recipe's learning rate and warm-up on {title}\n\n"
            + (f"A default `run`'s final fine-tune: " if s["steps"] == s["run_steps"] else
               f"Not a default `run`'s length ({s['run_steps']} steps): ")
            + f"{s['steps']} steps of {s['batch_size']}×{s['seq_len']} tokens; {s['dtype']}; losses are means over the "
            "seeds shown (± half the max − min spread); held-out loss on the whole test split (validation: the "
            f"{FINAL_EVAL_BLOCKS} validation blocks `train` reports, and the whole validation split; "
            + ("other source files' chunks of benchmarks/corpus.py's corpus (what they share with training: "
               "results/overlap.md)" if code else
               "other held-out topics, less the paragraphs training holds, results/overlap.md")
            + "; the recipes are chosen by none of them). "
            "`start`: uniform 4-bit r16 (what `run --budget 4bit` chose on the default data"
            + ("; a `run` on this corpus searches its own plan" if code else "") + ") with `train`'s default "
            f"start (`{s['adapter_init']}`); `{REFERENCE}`: the same with PEFT's zero start; `lora16`: LoRA r16 on the "
            "unquantized base. vs default: the start's loss at today's default recipe minus this one's (positive: "
            f"better). Gap recovered = ({REFERENCE} − start) / ({REFERENCE} − lora16) at the same recipe, of the means "
            "over the seeds all three rows ran. Seconds: a final's training (mean over the seeds).\n\n"
            + markdown_table(["row", "lr", "warm-up", "plan", "start", "seeds", "test loss", "validation (16 blocks)",
                              "validation (all)", "vs default",
                              "gap recovered", "s"], table) + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
