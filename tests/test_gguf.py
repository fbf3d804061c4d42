"""GGUF export (issue #30), checked by llama.cpp itself (llama-cpp-python, built from its pinned release):
HQQ codes written as Q4_1/Q5_1 blocks that dequantize to the weights qradaptor computes with (up to fp16
constants), a trained SmolLM2 run exported and run in llama.cpp with its adapter, logits compared with
`qradaptor.load`'s."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qradaptor.cli import main


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_hqq_codes_are_gguf_blocks(bits):
    import gguf

    from qradaptor.backends import get_backend
    from qradaptor.gguf_export import _quantized_tensor

    torch.manual_seed(bits)
    linear = torch.nn.Linear(128, 48, bias=False)
    module = get_backend("hqq").quantize(linear, bits, 64)
    perm = torch.randperm(48)
    data, kind, weight = _quantized_tensor(module, perm)
    assert kind == ("Q4_1" if bits <= 4 else "Q5_1")
    assert data.shape == (48, 128 // 32 * (20 if bits <= 4 else 24))
    assert torch.equal(weight, module.dequantize()[perm])
    written = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    # the same codes; only the constants are rounded to fp16 (d = s, m = -z·s)
    scale = module.scale.float().reshape(48, -1)[perm].repeat_interleave(64, dim=1)
    zero = module.zero.float().reshape(48, -1)[perm].repeat_interleave(64, dim=1)
    codes = module.codes()[perm].float()
    d, m = scale.half().float(), (-zero * scale).half().float()
    assert np.array_equal(written, (d * codes + m).numpy())
    assert float((torch.from_numpy(written) - weight).abs().max()) < 2e-3 * float(weight.abs().max())


def test_eight_bits_and_odd_groups_are_requantized_to_q8_0():
    from qradaptor.backends import get_backend
    from qradaptor.gguf_export import _quantized_tensor

    linear = torch.nn.Linear(64, 16, bias=False)
    for bits, group in ((8, 64), (4, 16)):
        data, kind, _ = _quantized_tensor(get_backend("hqq").quantize(linear, bits, group), None)
        assert kind == "Q8_0" and data.shape == (16, 64 // 32 * 34)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def exported(request, tmp_path_factory):
    """A 2-step fine-tune of the real SmolLM2-135M in each dtype with every kind of layer (3- to 8-bit, 16-bit),
    a layer whose modules have bits and ranks of their own, and group sizes of layers' and modules' own, exported
    with --gguf."""
    from qradaptor.plan import Plan

    tmp = tmp_path_factory.mktemp("gguf")
    plan = Plan.uniform(30, 4, 8).to_dict()
    for layer, bits in ((0, 3), (3, 5), (5, 8), (6, 16)):  # mostly 4 bits, and one layer of each other kind
        plan["layers"][layer]["bits"] = bits
    for layer in range(0, 30, 2):
        plan["layers"][layer]["rank"] = 4
    plan["layers"][1]["modules"] = {"k_proj": {"bits": 8}, "down_proj": {"bits": 5, "rank": 12}}  # modules' own
    # group sizes of their own: a layer's 32, a row of 1536 in groups of 128 (both their own codes), and groups of
    # 16 (smaller than a GGUF block: requantized)
    plan["layers"][2]["group_size"] = 32
    plan["layers"][1]["modules"]["down_proj"]["group_size"] = 128
    plan["layers"][3]["modules"] = {"q_proj": {"group_size": 16}}
    (tmp / "plan.json").write_text(json.dumps(plan))
    run, out = tmp / "run", tmp / "export"
    assert main(["train", "--plan", str(tmp / "plan.json"), "--dtype", request.param, "--steps", "2", "--seq-len", "32",
                 "--batch-size", "1", "--start-tokens", "256",  # the start's calibration forward: 8 blocks, not 128
                 "--lr", "1e-2", "--eval-blocks", "1", "--out", str(run), "-q"]) == 0
    assert main(["export", str(run), "--to", str(out), "--gguf", "--merge", "-q"]) == 0
    return out


def test_export_writes_model_adapter_and_modelfile(exported):
    import gguf

    assert (exported / "Modelfile").read_text() == "FROM ./model.gguf\nADAPTER ./adapter.gguf\n"
    info = json.loads((exported / "qradaptor" / "export.json").read_text())["gguf"]
    assert {"Q4_1", "Q5_1", "Q8_0", "F32"} <= set(info["types"])
    assert info["relative_error"]["Q4_1"] < 1e-5 and info["relative_error"]["Q5_1"] < 1e-5  # fp16 constants only
    assert info["merged"]["types"] == info["types"]  # merged.gguf: every tensor in the type model.gguf has it
    assert 1e-5 < info["merged"]["relative_error"]["Q4_1"] < 1e-2  # requantized (4 bits, groups of 32)
    model = gguf.GGUFReader(exported / "model.gguf")
    types = {t.name: t.tensor_type.name for t in model.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.1.attn_q.weight"] == "Q4_1"  # 3 and 4 bits
    assert types["blk.3.ffn_down.weight"] == "Q5_1"
    assert types["blk.1.attn_k.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "Q5_1"  # modules' own bits
    assert types["blk.2.attn_q.weight"] == "Q4_1" and types["blk.3.attn_k.weight"] == "Q5_1"  # own group sizes
    assert types["blk.3.attn_q.weight"] == "Q8_0"  # groups of 16
    dense = "F32" if info["dtype"] == "float32" else "BF16"  # 16-bit layers keep the run's dtype
    assert types["blk.5.attn_v.weight"] == "Q8_0" and types["blk.6.attn_k.weight"] == dense  # 8 and 16 bits
    assert types["blk.6.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings: llama.cpp uses token_embd
    adapter = gguf.GGUFReader(exported / "adapter.gguf")
    assert adapter.fields["adapter.lora.alpha"].contents() == 0.0
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in adapter.tensors}
    assert shapes["blk.1.attn_q.weight.lora_a"] == (576, 8) and shapes["blk.0.ffn_down.weight.lora_b"] == (4, 576)
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (1536, 12)  # its own rank


def test_llama_cpp_runs_the_export_as_qradaptor_does(exported):
    import qradaptor
    from qradaptor.llamacpp import LlamaCpp

    from transformers import AutoTokenizer

    model = qradaptor.load(exported)

    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = ("The for statement is used to iterate over the elements of a sequence (such as a string, tuple or list) "
            "or other iterable object. The starred target list is assigned each item in turn.")
    ids = tokenizer(text, return_tensors="pt").input_ids[0, :48]
    with torch.no_grad():  # in the run's dtype, as llama.cpp computes with the BF16 weights it was given
        ours = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
        with model.disable_adapter():
            ours_base = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)

    def kl(p_log, q_log):  # mean per-position KL(p ‖ q)
        return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())

    with LlamaCpp(exported / "model.gguf", exported / "adapter.gguf", n_ctx=64) as llm:
        theirs = torch.log_softmax(torch.from_numpy(llm.logits(ids.tolist())), -1)
    with LlamaCpp(exported / "model.gguf", n_ctx=64) as llm:
        theirs_base = torch.log_softmax(torch.from_numpy(llm.logits(ids.tolist())), -1)
    with LlamaCpp(exported / "merged.gguf", n_ctx=64) as llm:
        merged = torch.log_softmax(torch.from_numpy(llm.logits(ids.tolist())), -1)
    delta_ours, delta_theirs = (ours - ours_base).flatten(), (theirs - theirs_base).flatten()
    cosine = float(torch.nn.functional.cosine_similarity(delta_ours, delta_theirs, dim=0))
    # llama.cpp quantizes the activations to 8 bits for its Q4_1/Q5_1/Q8_0 matmuls: close, not equal. Measured on
    # this plan: 0.002-0.003 nats per token with and without the adapter (an all-F32 export agrees to 7e-7:
    # benchmarks/results/gguf_agreement.md). The bound is 4× that; q/k rows left in the HF order give 1.7.
    assert kl(ours, theirs) < 0.01 and kl(ours_base, theirs_base) < 0.01, (kl(ours, theirs), kl(ours_base, theirs_base))
    # the same next token wherever ours is not a near-tie: where its top two are within ~0.1 nats, that rounding
    # decides which comes first, and how it rounds depends on the CPU's kernels (AVX2 or AVX-512 builds of
    # llama.cpp: 5 of 41 positions flipped on an AVX-512 host, every one with both models' margins under 0.12 nats)
    top2 = ours.topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > 0.5
    same = ours.argmax(-1) == theirs.argmax(-1)
    assert clear.sum() >= len(ids) // 3 and same[clear].all(), (int(clear.sum()), int(same[clear].sum()), len(ids))
    # the adapter changes llama.cpp's logits as it changes qradaptor's (each module's scale right: measured 0.99)
    assert kl(ours, ours_base) > 5 * kl(ours, theirs)
    assert cosine > 0.95, cosine
    # merged.gguf (--merge --gguf): the adapters merged and requantized in the same types, the size of model.gguf.
    # Requantizing costs about a quantization's error (benchmarks/results/gguf_agreement.md), but the merged model
    # is nearer the fine-tuned one than the base without its adapter is
    assert (exported / "merged.gguf").stat().st_size == (exported / "model.gguf").stat().st_size
    assert kl(ours, merged) < kl(ours, ours_base), (kl(ours, merged), kl(ours, ours_base))


def test_gguf_export_refuses_a_tokenizer_llama_cpp_cannot_run(tmp_path, tiny_dir, capsys):
    from qradaptor.plan import Plan

    Plan.uniform(4, 4, 8).save(tmp_path / "plan.json")
    words = tmp_path / "w.txt"
    words.write_text("\n\n".join(" ".join(f"w{(i * 7 + j * 3) % 120}" for j in range(40)) for i in range(60)))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--plan", str(tmp_path / "plan.json"), "--data", str(words),
                 "--steps", "1", "--seq-len", "32", "--batch-size", "1", "--eval-blocks", "1", "--out", str(run),
                 "-q"]) == 0
    capsys.readouterr()
    rc = main(["export", str(run), "--to", str(tmp_path / "out"), "--gguf", "-q"])
    err = capsys.readouterr().err
    # a transformers directory is exported with metadata from its config and tokenizer (test_gguf_sources.py); this
    # one's word-level tokenizer has no llama.cpp form
    assert rc == 2 and "WordLevel" in err and "--gguf" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_gguf_sizes_are_predicted_exactly(exported):
    """`predict_gguf` (what `memory` shows and a gguf: budget bounds) prices the files the export wrote, to the
    byte, from the plan and the model's config alone (a model on the meta device): headers with the tokenizer,
    every tensor in its type, padding."""
    from qradaptor.backends import get_backend
    from qradaptor.gguf_export import predict_gguf
    from qradaptor.memory import meta_model
    from qradaptor.models import load_config
    from qradaptor.plan import Plan

    info = json.loads((exported / "qradaptor" / "export.json").read_text())
    plan, dtype = Plan.from_dict(info["plan"]), getattr(torch, info["config"]["dtype"])
    size = predict_gguf(meta_model(load_config(None)), plan, get_backend("hqq", compute_dtype=dtype), spec=None,
                        dtype=dtype)
    assert size.model_bytes == (exported / "model.gguf").stat().st_size
    assert size.adapter_bytes == (exported / "adapter.gguf").stat().st_size
    written = info["gguf"]["types"]
    assert all(written[kind] >= n for kind, n in size.types.items()) and sum(size.types.values()) == 210


def test_gguf_budget_prices_plans_as_the_export_writes_them(capsys, tmp_path):
    """The search's planner prices a gguf: budget's plans as `predict_gguf` does, and `memory` checks one."""
    from qradaptor.backends import get_backend
    from qradaptor.gguf_export import distinct_bits, predict_gguf
    from qradaptor.memory import ModelShapes, meta_model, parse_gguf_budget
    from qradaptor.models import load_config
    from qradaptor.plan import LayerChoice, Plan
    from qradaptor.errors import BudgetError
    from qradaptor.search import Planner, SearchConfig, check_searchable

    meta, backend = meta_model(load_config(None)), get_backend("hqq", compute_dtype=torch.bfloat16)
    shapes = ModelShapes.from_model(meta)
    fixed = predict_gguf(meta, Plan.uniform(30, 4, 4), backend, spec=None, dtype=torch.bfloat16).fixed_bytes
    config = SearchConfig(budget_bytes=parse_gguf_budget("gguf:120MB"), budget_on="gguf", gguf_fixed_bytes=fixed)
    planner = Planner(shapes, backend, None, config)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        picks = torch.randint(0, 4, (30, 2), generator=generator).tolist()
        plan = planner.plan([LayerChoice((2, 4, 5, 8)[b], (4, 8, 16, 32)[r]) for b, r in picks])
        assert planner.memory(plan) == predict_gguf(meta, plan, backend, spec=None, dtype=torch.bfloat16).total_bytes
    # 2 and 3 bits are written as Q4_1 (4 bits' bytes), 6 bits as Q8_0 (8 bits'): a gguf: budget searches 4, 5, 8
    assert distinct_bits(config.bits, shapes, group_size=64, has_codes=True) == (4, 5, 8)
    assert distinct_bits(config.bits, shapes, group_size=16, has_codes=True) == (8,)  # all Q8_0: groups < a block
    with pytest.raises(BudgetError, match="GGUF budget .* below the cheapest possible plan"):
        check_searchable(config, shapes, backend)  # 120 MB: below uniform 4-bit r4 in BF16 (~130 MB)
    config.budget_bytes = parse_gguf_budget("gguf:140MB")
    check_searchable(config, shapes, backend)

    Plan.uniform(30, 4, 16).save(tmp_path / "plan.json")
    assert main(["memory", "--plan", str(tmp_path / "plan.json"), "--dtype", "bfloat16", "--budget", "gguf:130MB"]) == 0
    out = capsys.readouterr().out
    assert "GGUF files:" in out and "Q4_1 ×210" in out and "on the GGUF files: the plan does NOT fit" in out, out
    assert main(["memory", "--plan", str(tmp_path / "plan.json"), "--budget", "gguf:12XB"]) == 2
    assert "gguf:SIZE" in capsys.readouterr().err


def test_gguf_budget_refuses_a_base_the_export_cannot_write(capsys, tmp_path, tiny_dir):
    from qradaptor.plan import Plan

    Plan.uniform(4, 4, 8).save(tmp_path / "plan.json")
    assert main(["memory", "--model", str(tiny_dir), "--plan", str(tmp_path / "plan.json")]) == 0
    assert "GGUF files:      not available" in capsys.readouterr().out
    rc = main(["memory", "--model", str(tiny_dir), "--plan", str(tmp_path / "plan.json"), "--budget", "gguf:1MB"])
    err = capsys.readouterr().err
    assert rc == 2 and "gguf: budget" in err and "4bit" in err and "Traceback" not in err, err
    rc = main(["search", "--model", str(tiny_dir), "--budget", "gguf:1MB", "--out", str(tmp_path / "s"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "gguf: budget" in err and "Traceback" not in err, err
    rc = main(["run", "--model", str(tiny_dir), "--budget", "gguf:1MB", "--out", str(tmp_path / "r"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "gguf: budget" in err and "Traceback" not in err, err
    assert not (tmp_path / "r" / "profile").exists()  # refused before the profile


def test_search_within_a_gguf_budget_on_smollm2(tmp_path):
    """A search with a gguf: budget (tiny settings) on the real SmolLM2: it searches the bit-widths whose GGUF types
    differ, every plan it measured is priced as its files would be written, within the budget."""
    import torch

    from qradaptor.backends import get_backend
    from qradaptor.commands import profile, search
    from qradaptor.gguf_export import predict_gguf
    from qradaptor.memory import meta_model, parse_gguf_budget
    from qradaptor.models import load_config

    # one bit-width is enough for the prior that orders repair and warm start (the others are extrapolated): the
    # test is about pricing, and each profiled bit-width quantizes the whole model once more
    profile(None, out=tmp_path / "p", bits=(4,), tokens=64, seq_len=32, dtype="float32", progress=False)
    result = search(None, budget="gguf:190MB", out=tmp_path / "s", trials=2, population=2, promote=0, refine=0,
                    warm_start=1, seq_len=32, dtype="float32", adapter_init="zero", progress=False,
                    sensitivity=str(tmp_path / "p" / "sensitivity.json"),
                    cheap={"name": "cheap", "steps": 1, "eval_blocks": 1, "batch_size": 1},
                    full={"name": "full", "steps": 2, "eval_blocks": 1, "batch_size": 1})
    assert result.config["budget_on"] == "gguf" and tuple(result.config["bits"]) == (4, 5, 8)
    meta, backend = meta_model(load_config(None)), get_backend("hqq", compute_dtype=torch.float32)
    for point in result.points:
        size = predict_gguf(meta, point.plan, backend, spec=None, dtype=torch.float32).total_bytes
        assert point.memory_bytes == size <= parse_gguf_budget("gguf:190MB")
    assert "on the GGUF files" in (tmp_path / "s" / "search-summary.txt").read_text()
