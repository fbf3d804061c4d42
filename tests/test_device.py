"""--device: resolving it, and every stage on it. The CPU tests run everywhere; the CUDA tests run where PyTorch sees
a GPU and are skipped elsewhere (the CPU suite is the same either way)."""

from __future__ import annotations

import json

import pytest
import torch

from qradaptor.cli import main
from qradaptor.device import PeakMemory, model_device, resolve_device
from qradaptor.errors import DeviceError
from qradaptor.plan import Plan

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
FAST = dict(seq_len=32, batch_size=2, eval_blocks=2, warmup_steps=0, progress=False)


@pytest.fixture
def words(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(30)) for i in range(40)))
    return str(path)


# ------------------------------------------------------------------------------------------- resolving


def test_auto_picks_a_gpu_only_when_pytorch_sees_one():
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name, words", [("tpu", "unknown device"), ("mps", "not supported"),
                                         ("cuda:99", "no GPU 99" if CUDA else "CUDA GPU")])
def test_a_device_that_is_not_there_is_refused_with_a_fix(name, words):
    with pytest.raises(DeviceError) as e:
        resolve_device(name)
    assert words in e.value.cause and "--device" in e.value.fix


@pytest.mark.skipif(CUDA, reason="asks for a GPU where there is none")
def test_cuda_without_a_gpu_fails_before_anything_is_written(tiny_dir, words, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    Plan.uniform(4, 4, 8).save(plan)
    code = main(["train", "--model", str(tiny_dir), "--data", words, "--plan", str(plan), "--steps", "1",
                 "--device", "cuda", "--out", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "asks for a CUDA GPU" in err and "fix: use --device cpu" in err
    assert not (tmp_path / "run").exists()


def test_peak_memory_on_the_cpu_is_the_peak_of_the_phase_only():
    from qradaptor.memory import release_free_memory

    block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched: an earlier phase's peak
    del block
    release_free_memory()  # as train does before it starts measuring: freed pages go back to the system
    peak = PeakMemory("cpu").start()
    assert peak.reset and "resident" in peak.describe()
    start = peak.bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB in this phase
    assert peak.bytes() - start >= 48 * 2**20
    del block


@pytest.mark.parametrize("setting, expected", [(None, "huge-pages"), ("0", "glibc"), ("1", "huge-pages")])
def test_importing_qradaptor_turns_on_pytorchs_huge_page_allocation_unless_the_user_set_it(setting, expected):
    import os
    import subprocess
    import sys
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.is_file() or "[never]" in thp.read_text():
        expected = "glibc"  # no transparent huge pages here: the path does nothing, and cpu_allocator says so
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    # as a user's script does: torch first, then qradaptor, then the first tensors
    code = "import torch, qradaptor\nfrom qradaptor.device import cpu_allocator\nprint(cpu_allocator())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == expected


def test_training_memory_prices_the_heap_by_allocator(tiny_config):
    from qradaptor.backends import get_backend
    from qradaptor.device import cpu_allocator
    from qradaptor.memory import ALLOCATOR_RETENTION, ModelShapes, training_memory

    est = lambda **kw: training_memory(ModelShapes.from_config(tiny_config), Plan.uniform(4, 4, 8),
                                       get_backend("hqq"), tiny_config, batch_size=4, seq_len=64, **kw)
    glibc, huge = est(allocator="glibc"), est(allocator="huge-pages")
    assert glibc.live_peak_bytes == huge.live_peak_bytes  # the same tensors
    assert ALLOCATOR_RETENTION["huge-pages"] < ALLOCATOR_RETENTION["glibc"]
    assert huge.allocator_bytes < glibc.allocator_bytes and huge.peak_bytes < glibc.peak_bytes
    assert est().allocator == cpu_allocator() and huge.to_dict()["allocator"] == "huge-pages"
    gpu = est(device="cuda")  # pricing only: nothing is placed on a GPU
    assert gpu.allocator == "" and gpu.allocator_bytes == 0 and gpu.runtime_bytes == 0


def test_model_device_is_where_its_tensors_are(tiny_model):
    assert model_device(tiny_model) == torch.device("cpu")
    assert model_device(torch.nn.Module()) == torch.device("cpu")


# ------------------------------------------------------------------------------------------- the CPU path


def test_train_on_the_cpu_records_its_device_and_measured_peak(tiny_dir, words, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    Plan.uniform(4, 4, 8).save(plan)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dir), "--data", words, "--plan", str(plan), "--steps", "2",
                 "--seq-len", "32", "--batch-size", "2", "--eval-blocks", "2", "--device", "cpu",
                 "--out", str(out), "-q"]) == 0
    assert "training peak" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert run["config"]["device"] == "cpu"
    peak = metrics["training_peak"]
    assert peak["device"] == "cpu" and peak["measured_bytes"] > 0 and peak["predicted_bytes"] > 0
    assert run["training_estimate"]["allocator"] in ("glibc", "huge-pages")


def test_quantizing_onto_the_device_gives_the_same_model(tiny_model):
    from qradaptor.quantize import quantize_model

    plan = Plan.uniform(tiny_model.config.num_hidden_layers, 4, 8)
    here = quantize_model(tiny_model, plan, "hqq")
    there = quantize_model(tiny_model, plan, "hqq", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(here.state_dict().values(), there.state_dict().values()))
    assert model_device(there) == torch.device("cpu")


def test_a_cached_hqq_native_layer_moves_whole_to_the_device_asked_for():
    # hqq's own HQQLinear.to does nothing: a cache hit asked for on another device stayed put, and a model's .to
    # moved its codes but not its scales and zeros. The meta device stands in for a GPU here.
    from qradaptor.backends import QuantCache, get_backend

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=True)
    cache = QuantCache(get_backend("hqq-native"))
    here = cache.get("l", linear, 4, 64)
    there = cache.get("l", linear, 4, 64, device="meta")
    assert cache.hits == 1 and cache.misses == 1
    moved = [there.W_q, there.meta["scale"], there.meta["zero"], there.bias]
    assert all(t.device.type == "meta" for t in moved) and str(there.device) == "meta"
    assert here.W_q.device.type == "cpu" and here.meta["scale"].device.type == "cpu"  # the cached one stays
    assert there.to(torch.float32) is there and there.W_q.device.type == "meta"  # a dtype alone changes nothing


def test_a_model_moved_whole_moves_its_hqq_native_layers_whole():
    # nn.Module.to on a parent reaches each child through _apply, not the child's .to: that moved the codes (a
    # Parameter) and left the scales, zeros and bias behind. The meta device stands in for a GPU.
    from qradaptor.backends import get_backend

    torch.manual_seed(0)
    layer = get_backend("hqq-native").quantize(torch.nn.Linear(128, 64, bias=True), 4, 64)
    scale_dtype = layer.meta["scale"].dtype
    model = torch.nn.Sequential(layer, torch.nn.Linear(64, 8))
    model.half()  # hqq fixes its dtypes at quantization: a dtype change leaves the layer as it was
    assert layer.meta["scale"].dtype == scale_dtype and layer.W_q.dtype == torch.uint8
    model.to("meta")
    moved = [layer.W_q, layer.meta["scale"], layer.meta["zero"], layer.bias, model[1].weight]
    assert all(t.device.type == "meta" for t in moved) and str(layer.device) == "meta"
    alone = get_backend("hqq-native").quantize(torch.nn.Linear(128, 64, bias=True), 4, 64)
    assert alone.to("meta") is alone  # the layer's own .to (a no-op in hqq) moves it whole too
    assert all(t.device.type == "meta" for t in (alone.W_q, alone.meta["scale"], alone.meta["zero"], alone.bias))


# ------------------------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("backend", ["hqq", "hqq-native", "reference"])
def test_lora_gradients_on_cuda_match_the_cpu(tiny_model, backend):
    from qradaptor.evaluate import token_nll
    from qradaptor.quantize import prepare_model

    plan = Plan.uniform(tiny_model.config.num_hidden_layers, 4, 8)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    grads = {}
    for device in ("cpu", "cuda"):
        tuned = prepare_model(tiny_model, plan, backend, dtype=torch.bfloat16, device=device)
        assert model_device(tuned).type == device
        nll, n = token_nll(tuned, ids, ids)  # the batch is moved to the model
        (nll / n).backward()
        grads[device] = {k: p.grad.float().cpu() for k, p in tuned.named_parameters() if p.requires_grad}
    assert grads["cpu"].keys() == grads["cuda"].keys()
    for k, g in grads["cpu"].items():
        torch.testing.assert_close(grads["cuda"][k], g, rtol=5e-2, atol=5e-3, msg=k)


@needs_cuda
def test_a_cached_hqq_native_layer_asked_for_on_cuda_dequantizes_there_as_on_the_cpu():
    from qradaptor.backends import QuantCache, get_backend

    torch.manual_seed(0)
    cache = QuantCache(get_backend("hqq-native"))
    linear = torch.nn.Linear(128, 64)
    on_cpu = cache.get("l", linear, 4, 64)
    on_gpu = cache.get("l", linear, 4, 64, device="cuda")  # a hit, copied there
    assert on_gpu.W_q.device.type == "cuda" and on_gpu.meta["scale"].device.type == "cuda"
    torch.testing.assert_close(on_gpu.dequantize().cpu(), on_cpu.dequantize())


@needs_cuda
def test_train_export_and_load_on_cuda(tiny_dir, words, tmp_path):
    import qradaptor
    from qradaptor.commands import export, train_plan

    plan = Plan.uniform(4, 4, 8)
    result = train_plan(tmp_path / "run", plan=plan, model=str(tiny_dir), data=words, steps=2, device="cuda", **FAST)
    peak = result.metrics["training_peak"]
    assert peak["device"].startswith("cuda") and peak["measured_bytes"] > 0 and "allocated" in peak["what"]
    assert model_device(result.model).type == "cuda"
    export(tmp_path / "run", tmp_path / "out")
    on_gpu = qradaptor.load(tmp_path / "out", device="cuda")
    on_cpu = qradaptor.load(tmp_path / "out", device="cpu")
    assert model_device(on_gpu).type == "cuda" and model_device(on_cpu).type == "cpu"
    ids = torch.arange(16).view(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(ids.cuda()).logits.float().cpu(), on_cpu(ids).logits.float(),
                                   rtol=5e-2, atol=5e-2)


@needs_cuda
def test_profile_on_cuda_ranks_the_layers_as_the_cpu_does(tiny_dir, words, tmp_path):
    from qradaptor.commands import profile

    kw = dict(data=words, bits=(2, 4), tokens=512, seq_len=32, use_cache=False, progress=False)
    cpu = profile(str(tiny_dir), out=tmp_path / "cpu", device="cpu", **kw)
    gpu = profile(str(tiny_dir), out=tmp_path / "gpu", device="cuda", **kw)
    for layer in range(cpu.layers):
        assert gpu.kl[layer][2] == pytest.approx(cpu.kl[layer][2], rel=0.05)
