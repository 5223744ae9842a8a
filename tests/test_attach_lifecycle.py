"""Attaching is transactional, refuses overlaps, keeps no model alive, and changes
nothing outside the model it is attached to.

* A failure at any step of ``ph.attach`` (locate, build, freeze, registering the
  prompt module, installing each hook) leaves the model exactly as before
  (state_dict, flags, hooks, module tree) and raises the original error.
* Attaching to a submodule of an attached model, to a model that contains one,
  or to a model that shares parameters with one is refused, naming it.
* An attached model the user drops is garbage-collected.
* ``nn.MultiheadAttention`` models: PyTorch's fused fast path is switched off
  per module (``nn.TransformerEncoder.use_nested_tensor``) while attached,
  never process-wide, and the setting comes back on detach.
"""

from __future__ import annotations

import gc
import importlib
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import prompthooks as ph
from tests.support.models import batch, same_snapshot, snapshot, tiny
from tests.support.plain_models import PlainLM

# ``prompthooks.attach`` is also the name of the function the package exports.
attach_module = importlib.import_module("prompthooks.attach")


class Injected(RuntimeError):
    """The failure a test injects."""


SPECS: dict[str, Callable[[], Any]] = {
    "prompt": lambda: ph.PromptTuning(3),
    "prefix": lambda: ph.PrefixTuning(3),
    "both": lambda: {"p": ph.PromptTuning(3), "q": ph.PrefixTuning(2)},
}


def _counting_failure(
    monkeypatch: pytest.MonkeyPatch, owners: list[tuple[Any, str]], fail_at: int
) -> list[int]:
    """Make the ``fail_at``-th call (0-based, counted over all of them) of the
    methods ``owner.name`` raise ``Injected``; the others behave as before.
    Returns the call counter."""
    calls = [0]
    for owner, name in owners:
        original = getattr(owner, name)

        def failing(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] - 1 == fail_at:
                raise Injected(f"call {fail_at}")
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, failing)
    return calls


HOOK_REGISTRATIONS = [
    (nn.Module, "register_forward_pre_hook"),
    (nn.Module, "register_forward_hook"),
]


def _registrations(arch: str, method: str) -> int:
    """How many hooks an attach installs on this model with this spec."""
    model = tiny(arch)
    before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    att = ph.attach(model, SPECS[method]())
    after = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    att.detach()
    return after - before


def _assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    assert same_snapshot(before, snapshot(model))
    assert not hasattr(model, attach_module.ATTRIBUTE)
    assert all(state.located.model is not model for state in attach_module._ATTACHED)
    ph.attach(model, ph.PromptTuning(2)).detach()  # nothing stale is left behind


@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize("arch", ["gpt2", "t5", "bert"])
def test_a_failing_hook_install_leaves_the_model_as_it_was(
    arch: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every hook registration of the attach fails in turn."""
    count = _registrations(arch, method)
    assert count > 3
    for fail_at in range(count):
        model = tiny(arch)
        next(model.parameters()).requires_grad_(False)  # a flag of the user's own
        before = snapshot(model)
        with monkeypatch.context() as patch:
            _counting_failure(patch, HOOK_REGISTRATIONS, fail_at)
            with pytest.raises(Injected):
                ph.attach(model, SPECS[method]())
        _assert_untouched(model, before)


@pytest.mark.parametrize("fail_at", [0, 7, 20])
def test_a_failing_freeze_leaves_every_flag_as_it_was(
    fail_at: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny("llama")
    model.lm_head.weight.requires_grad_(False)
    before = snapshot(model)
    with monkeypatch.context() as patch:
        _counting_failure(patch, [(nn.Parameter, "requires_grad_")], fail_at)
        with pytest.raises(Injected):
            ph.attach(model, ph.PrefixTuning(3))
    _assert_untouched(model, before)


def test_failing_locate_build_or_registration_leave_the_model_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny("llama")
    before = snapshot(model)
    with monkeypatch.context() as patch:
        _counting_failure(patch, [(attach_module, "locate")], 0)
        with pytest.raises(Injected):
            ph.attach(model, ph.PromptTuning(3))
    _assert_untouched(model, before)
    with monkeypatch.context() as patch:
        _counting_failure(patch, [(ph.PrefixTuning, "build")], 0)
        with pytest.raises(Injected):
            ph.attach(model, {"a": ph.PromptTuning(3), "b": ph.PrefixTuning(3)})
    _assert_untouched(model, before)
    with monkeypatch.context() as patch:
        _counting_failure(patch, [(model, "add_module")], 0)
        with pytest.raises(Injected):
            ph.attach(model, ph.PromptTuning(3))
    _assert_untouched(model, before)


# -- overlaps ------------------------------------------------------------------------


def test_attaching_to_a_submodule_of_an_attached_model_is_refused() -> None:
    model = tiny("llama")
    with ph.attach(model, ph.PromptTuning(3)):
        before = snapshot(model.model)
        with pytest.raises(ValueError, match="is a submodule of an attached LlamaForCausalLM"):
            ph.attach(model.model, ph.PromptTuning(3))
        assert same_snapshot(before, snapshot(model.model))
    ph.attach(model.model, ph.PromptTuning(3)).detach()  # free again after detaching


def test_attaching_to_a_model_that_contains_an_attached_one_is_refused() -> None:
    model = tiny("llama")
    with ph.attach(model.model, ph.PromptTuning(3)):
        with pytest.raises(ValueError, match="contains an attached LlamaModel"):
            ph.attach(model, ph.PrefixTuning(3))
    # detaching in the wrong order is impossible now; the flags are the user's again
    assert all(p.requires_grad for p in model.parameters())


def test_attaching_to_a_model_that_shares_parameters_is_refused() -> None:
    first, second = tiny("gpt2"), tiny("gpt2", seed=1)
    second.transformer.wte = first.transformer.wte  # a tied embedding across models
    with ph.attach(first, ph.PromptTuning(3)):
        with pytest.raises(ValueError, match="shares parameters with an attached GPT2LMHeadModel"):
            ph.attach(second, ph.PromptTuning(3))
    ph.attach(second, ph.PromptTuning(3)).detach()


# -- no global references ------------------------------------------------------------


@pytest.mark.parametrize("method", list(SPECS))
def test_an_attached_model_that_is_dropped_is_freed(method: str) -> None:
    model = tiny("llama")
    att = ph.attach(model, SPECS[method]())
    ids, mask = batch("llama", [4, 2])
    with torch.no_grad(), att.use(att.names):  # one prompt per row
        model(input_ids=ids, attention_mask=mask)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    gone = weakref.ref(model)
    del model, att
    gc.collect()
    assert gone() is None


# -- nn.MultiheadAttention's fast path -------------------------------------------------


def test_the_fast_path_is_switched_off_per_module_not_per_process() -> None:
    prompted, plain = PlainLM(), PlainLM(seed=1)
    seen: list[bool] = []
    prompted.head.register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.mha.get_fastpath_enabled())
    )
    assert prompted.body.use_nested_tensor and plain.body.use_nested_tensor
    ids = torch.randint(1, 10, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with ph.attach(prompted, ph.PrefixTuning(2)), torch.no_grad():
        prompted(input_ids=ids, attention_mask=mask)
        assert not prompted.body.use_nested_tensor  # this model's encoder only
        assert plain.body.use_nested_tensor
    assert seen == [True]  # the process-wide switch was never flipped
    assert prompted.body.use_nested_tensor  # its own setting is back
