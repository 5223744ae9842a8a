"""``torch.compile`` with prompts attached: no graph break of the library's
making, and compiled forward + backward equal to eager.

The graph-break count is dynamo's own (``torch._dynamo.explain``) over a function
that calls the model (so the hooks on the model itself are traced with it),
compared with the base model's under the same call: the base models here compile
in one graph, so any break would be the library's. Checked for each method on
GPT-2, LLaMA, T5 and BERT and for a mixed batch of all methods. Compiled training
steps (loss, logits, prompt gradients) equal eager: AOTAutograd on all four
families, inductor on GPT-2 (prompt) and LLaMA (prefix). Switching prompts after
compiling follows the selection; templates under compile are declared with
``att.use(template=True)``, and an undeclared one fails loudly. The custom ops
(``prompthooks::*``) are checked with ``torch.library.opcheck`` (schema, fake
tensors, autograd registration) on both kernel paths and against the eager
reference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import prompthooks as ph
from prompthooks.kernels import ops
from prompthooks.kernels.torch_concat import concat_forward
from prompthooks.kernels.torch_splice import splice_forward
from tests.support.models import ARCHS, batch, decoder_ids, tiny

# transformers logs a warning (a graph break for the base model too) when
# ``loss_type`` is unset; naming it lets the base model compile in one graph.
LOSS_TYPE = {
    "gpt2": "ForCausalLM",
    "llama": "ForCausalLM",
    "t5": "ForConditionalGeneration",
    "bert": "ForMaskedLM",
}

SPECS: dict[str, Callable[[], Any]] = {
    "prompt": lambda: ph.PromptTuning(4),
    "p_tuning_mlp": lambda: ph.PTuning(3, encoder="mlp"),
    "prefix": lambda: ph.PrefixTuning(3),
    "ptv2": lambda: ph.PrefixTuning(2, projection=False),
}


def training_model(arch: str) -> nn.Module:
    model = tiny(arch).train()
    model.loss_type = LOSS_TYPE[arch]
    for module in model.modules():  # dropout would make eager and compiled differ
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():  # rates kept as floats (T5 attention)
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def training_batch(arch: str) -> dict[str, torch.Tensor]:
    ids, mask = batch(arch, [6, 3, 5], seed=3)
    kw = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if arch == "t5":
        kw["decoder_input_ids"] = decoder_ids(3)
        kw["labels"] = decoder_ids(3, seed=4)
    return kw


def loss_of(model: nn.Module, kw: dict[str, torch.Tensor]) -> torch.Tensor:
    loss: torch.Tensor = model(**kw, use_cache=False).loss
    return loss


def graph_breaks(function: Callable[..., Any], kw: dict[str, torch.Tensor]) -> tuple[int, list]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(function)(**kw)
    ours = [
        reason.reason
        for reason in explained.break_reasons
        if any("prompthooks" in frame.filename for frame in reason.user_stack)
    ]
    return explained.graph_break_count, ours


@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize("arch", ARCHS)
def test_the_library_adds_no_graph_break(arch: str, method: str) -> None:
    model, kw = training_model(arch), training_batch(arch)
    base_breaks, _ = graph_breaks(lambda **k: loss_of(model, k), kw)
    with ph.attach(model, SPECS[method]()):
        breaks, ours = graph_breaks(lambda **k: loss_of(model, k), kw)
    assert ours == []
    assert breaks == base_breaks == 0


def test_a_mixed_batch_adds_no_graph_break() -> None:
    model, kw = training_model("gpt2"), training_batch("gpt2")
    prompts = {"a": ph.PromptTuning(4), "b": ph.PTuning(2, encoder="mlp"), "c": ph.PrefixTuning(3)}
    with ph.attach(model, prompts) as att, att.use(["a", "b", "c"]):
        breaks, ours = graph_breaks(lambda **k: loss_of(model, k), kw)
    assert (breaks, ours) == (0, [])


def eager_and_compiled(
    arch: str, spec: Any, backend: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Loss, logits and prompt gradients of one training step, eager then compiled,
    from the same starting prompt."""
    kw = training_batch(arch)
    results = []
    model = training_model(arch)
    torch.manual_seed(5)
    att = ph.attach(model, spec)
    start = copy.deepcopy(att.prompts.state_dict())
    for compiled in (False, True):
        att.prompts.load_state_dict(start)
        att.prompts.zero_grad()
        run = torch.compile(model, backend=backend) if compiled else model
        out = run(**kw, use_cache=False)
        out.loss.backward()
        grads = [p.grad.clone() for p in att.parameters()]
        assert all(g.abs().sum() > 0 for g in grads)  # the prompt is trained
        results.append([out.loss.detach(), out.logits.detach(), *grads])
    att.detach()
    torch._dynamo.reset()
    return results[0], results[1]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_training_step_equals_eager(arch: str, method: str) -> None:
    """Dynamo and AOTAutograd trace forward and backward (the custom ops'
    fake and autograd formulas included); eager runs the same graph."""
    eager, compiled = eager_and_compiled(arch, SPECS[method](), "aot_eager")
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("arch", "method"), [("gpt2", "prompt"), ("llama", "prefix")])
def test_inductor_training_step_equals_eager(arch: str, method: str) -> None:
    """The default backend: inductor generates its own code around the custom ops."""
    eager, compiled = eager_and_compiled(arch, SPECS[method](), "inductor")
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_compiled_templates_are_declared() -> None:
    """A compiled call cannot look at the ids: a template is declared with
    ``att.use(template=True)``; undeclared, or declared wrongly, it fails loudly."""
    model = tiny("gpt2")
    att = ph.attach(model, ph.PTuning(3, encoder="mlp"))
    ids, mask = batch("gpt2", [5, 5], seed=2)
    virtual = torch.tensor(att.virtual_ids())
    template = torch.cat([ids[:, :2], virtual.expand(2, 3), ids[:, 2:]], dim=1)
    full = torch.ones_like(template)
    with att.use(template=True):
        eager = model(input_ids=template, attention_mask=full).logits
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(compiled(input_ids=template, attention_mask=full).logits, eager)
        with pytest.raises(RuntimeError, match=r"template=True\) was declared"):
            compiled(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="hold virtual ids"):
        compiled(input_ids=template, attention_mask=full)
    plain = compiled(input_ids=ids, attention_mask=mask).logits  # undeclared, no template: fine
    torch.testing.assert_close(plain, model(input_ids=ids, attention_mask=mask).logits)
    att.detach()
    torch._dynamo.reset()


# -- the custom ops themselves ------------------------------------------------------


def splice_case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 5, 7, generator=g).to(dtype).requires_grad_(True)
    table = torch.randn(3, 7, generator=g, requires_grad=True)
    ids = torch.tensor([[1, 50, 51, 4, 50], [52, 2, 3, 4, 5]])  # row 0 of the table used twice
    return embeds, ids, table


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_splice_and_concat(backend: str) -> None:
    embeds, ids, table = splice_case(torch.float32)
    torch.library.opcheck(ops.splice_tokens, (embeds, ids, table, 50, backend))
    g = torch.Generator().manual_seed(1)
    states = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    for prefix in (torch.randn(3, 2, 5, generator=g), torch.randn(2, 3, 2, 5, generator=g)):
        torch.library.opcheck(ops.prefix_concat, (prefix.requires_grad_(True), states, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_backward_equals_the_reference_under_autograd(dtype: torch.dtype) -> None:
    """What compiled graphs run (the op and its registered backward) against what
    eager CPU users run (the reference under torch's autograd)."""
    embeds, ids, table = splice_case(dtype)
    grad = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    outs = []
    for function in (splice_forward, lambda e, i, t, v: ops.splice_tokens(e, i, t, v, "torch")):
        e, t = (
            embeds.detach().clone().requires_grad_(True),
            table.detach().clone().requires_grad_(True),
        )
        out = function(e, ids, t, 50)
        out.backward(grad)
        outs.append((out.detach(), e.grad, t.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    states = torch.randn(2, 3, 4, 5, dtype=dtype, requires_grad=True)
    prefix = torch.randn(3, 2, 5, requires_grad=True)
    grad = torch.randn(2, 3, 6, 5).to(dtype)
    results = []
    for function in (concat_forward, lambda p, s: ops.prefix_concat(p, s, "torch")):
        p, s = (
            prefix.detach().clone().requires_grad_(True),
            states.detach().clone().requires_grad_(True),
        )
        out = function(p, s)
        out.backward(grad)
        results.append((out.detach(), p.grad, s.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


def test_the_lstm_encoder_compiles_with_dynamos_rnn_switch() -> None:
    """Dynamo leaves ``nn.LSTM`` out of its graphs unless ``allow_rnn`` is set
    (torch's own switch, off by default). With it, P-tuning's LSTM encoder adds no
    graph break and the compiled step equals eager."""
    model, kw = training_model("gpt2"), training_batch("gpt2")
    with torch._dynamo.config.patch(allow_rnn=True):
        with ph.attach(model, ph.PTuning(3, encoder="lstm")):
            breaks, ours = graph_breaks(lambda **k: loss_of(model, k), kw)
        assert (breaks, ours) == (0, [])
        eager, compiled = eager_and_compiled("gpt2", ph.PTuning(3, encoder="lstm"), "aot_eager")
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


def test_switching_prompts_after_compiling_uses_the_new_prompt() -> None:
    """The selection is Python state: a compiled model must follow it (dynamo
    guards on it), never replay the graph of the previous prompt."""
    model = tiny("llama")
    att = ph.attach(
        model, {"a": ph.PromptTuning(3), "b": ph.PrefixTuning(2), "c": ph.PromptTuning(5)}
    )
    ids, mask = batch("llama", [5, 3], seed=6)
    compiled = torch.compile(model, backend="aot_eager")
    for selection in ["a", "b", "c", ["a", "b"], "a"]:
        with att.use(selection):
            eager = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            out = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
    att.detach()
    torch._dynamo.reset()
