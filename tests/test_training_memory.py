"""What keeps training memory low: the chunked loss, gradient checkpointing, quantizing without a second
full-precision copy (tiny random Llama models; the measured savings live in benchmarks/memory.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qradaptor.data import TokenBlocks
from qradaptor.evaluate import token_nll
from qradaptor.plan import LayerChoice, Plan
from qradaptor.quantize import prepare_model


def _ids(n=3, seq=24, vocab=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=gen)


def _plain_nll(model, ids, labels):
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000])
def test_chunked_loss_equals_the_plain_loss_and_gradients(tiny_model, chunk_tokens):
    plan = Plan([LayerChoice(4, 8), LayerChoice(3, 4), LayerChoice(8, 8), LayerChoice(16, 4)])
    model = prepare_model(tiny_model, plan, "hqq")
    for p in model.parameters():  # LoRA B starts at zero; move it so every gradient is non-trivial
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    ids = _ids()
    labels = ids.clone()
    labels[0, :5] = -100  # masked prompt tokens are left out, as in chat data
    nll, count = token_nll(model, ids, labels, chunk_values=chunk_tokens * 128)
    nll.backward()
    chunked = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    plain = _plain_nll(model, ids, labels)
    plain.backward()
    assert count == int((labels[:, 1:] != -100).sum()) == 3 * 23 - 4
    torch.testing.assert_close(nll, plain, rtol=1e-5, atol=1e-4)
    want = _lora_grads(model)
    assert chunked.keys() == want.keys() and chunked
    for key in want:
        torch.testing.assert_close(chunked[key], want[key], rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_holds_the_full_logits(tiny_config):
    """Under autograd, nothing with a vocabulary-sized last dimension and more than one chunk of rows is kept."""
    from transformers import LlamaForCausalLM

    vocab = 160  # no other dimension of the tiny model has this size
    torch.manual_seed(0)
    model = prepare_model(LlamaForCausalLM(tiny_config.__class__(**{**tiny_config.to_dict(), "vocab_size": vocab})),
                          Plan.uniform(4, 4, 8), "hqq")
    model.train()
    ids = _ids(n=4, seq=32, vocab=vocab)

    def logit_rows(loss) -> int:
        shapes = saved_shapes(loss)
        return max((torch.Size(s).numel() // vocab for s in shapes if s and s[-1] == vocab), default=0)

    # chunks are recomputed in backward: no logits saved at all; the plain loss keeps them (the check can fail)
    assert logit_rows(lambda: token_nll(model, ids, ids, chunk_values=8 * vocab)[0]) == 0
    assert logit_rows(lambda: _plain_nll(model, ids, ids)) >= 4 * 31


def saved_shapes(loss_fn) -> list[tuple]:
    """Shapes of every tensor autograd saves while ``loss_fn()`` runs; then backward through the loss."""
    saved: list[tuple] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return saved


def test_no_labelled_token_gives_a_zero_loss_that_backpropagates(tiny_model):
    model = prepare_model(tiny_model, Plan.uniform(4, 4, 8), "hqq")
    model.train()
    ids = _ids(n=2, seq=8)
    nll, count = token_nll(model, ids, torch.full_like(ids, -100))
    assert count == 0 and float(nll) == 0.0
    nll.backward()


def _blocks(n=12, seq=32, vocab=128):
    ids = _ids(n=n, seq=seq, vocab=vocab)
    return TokenBlocks(input_ids=ids, labels=ids.clone())


@pytest.mark.parametrize("backend", ["hqq", "hqq-native", "reference"])
def test_gradient_checkpointing_trains_exactly_like_plain_backward(tiny_model, backend):
    from qradaptor.train import TrainConfig, train

    plan = Plan([LayerChoice(4, 8), LayerChoice(8, 4), LayerChoice(16, 8), LayerChoice(4, 4)])
    runs = {}
    for checkpointing in (False, True):
        model = prepare_model(tiny_model, plan, backend, seed=0)
        result = train(model, _blocks(), TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1,
                                                     gradient_checkpointing=checkpointing), progress=False)
        assert not model.get_base_model().is_activation_checkpointing  # switched off again afterwards
        runs[checkpointing] = (result.losses, {n: p.detach().clone() for n, p in model.named_parameters()
                                               if "lora_" in n})
    (plain_losses, plain_weights), (ckpt_losses, ckpt_weights) = runs[False], runs[True]
    assert plain_losses == pytest.approx(ckpt_losses, rel=1e-5)
    assert plain_losses[-1] < plain_losses[0]  # it did train
    for key in plain_weights:
        torch.testing.assert_close(ckpt_weights[key], plain_weights[key], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_keeps_only_layer_inputs(tiny_model):
    """With checkpointing the forward saves far fewer tensors: each decoder layer keeps its input only."""
    plan = Plan.uniform(4, 4, 8)
    counts = {}
    for checkpointing in (False, True):
        model = prepare_model(tiny_model, plan, "hqq")
        if checkpointing:
            model.get_base_model().activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = _ids(n=2, seq=16)
        counts[checkpointing] = sum(torch.Size(s).numel() for s in saved_shapes(lambda: token_nll(model, ids, ids)[0]))
    assert counts[True] < counts[False] / 3, counts


def test_quantizing_in_place_frees_each_source_weight(tiny_model):
    import gc
    import weakref

    from qradaptor.quantize import decoder_layers, layer_linears, quantize_model

    plan = Plan([LayerChoice(4, 8), LayerChoice(16, 8), LayerChoice(3, 8), LayerChoice(8, 8)])
    refs = {(i, name): weakref.ref(lin.weight) for i, (_, layer) in enumerate(decoder_layers(tiny_model))
            for name, lin in layer_linears(layer)}
    out = quantize_model(tiny_model, plan, "hqq", inplace=True)
    gc.collect()
    assert out is tiny_model
    alive = {key for key, ref in refs.items() if ref() is not None}
    assert alive == {key for key in refs if key[0] == 1}  # only the 16-bit layer keeps its dense weights


def test_a_copy_shares_no_quantized_source_and_leaves_the_model_intact(tiny_model):
    from qradaptor.errors import BackendError
    from qradaptor.quantize import quantize_model

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    out = quantize_model(tiny_model, Plan.uniform(4, 4, 8), "hqq")
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
    source = {id(p) for p in tiny_model.parameters()}
    assert not any(id(p) in source for p in out.parameters())
    # a plan the backend cannot apply fails before an in-place quantization touches anything
    with pytest.raises(BackendError, match="groups of 48"):
        quantize_model(tiny_model, Plan.uniform(4, 4, 8, group_size=48), "hqq", inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
