"""Attaching prompts to a model: install hooks, register the prompt
parameters, freeze the base, and undo all of it exactly on detach."""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from torch import nn

from .hooks.bank import PromptBank
from .hooks.inputs import InputPrefixHooks
from .hooks.prefix import PrefixHooks
from .hooks.tokens import SoftPromptHooks
from .locators import Located, locate
from .methods.base import PromptSpec, SoftPrompt

PromptLike = PromptSpec | SoftPrompt
Prompts = PromptLike | Mapping[str, PromptLike]

#: Attribute under which the prompts are registered on the model while attached.
ATTRIBUTE = "prompthooks"
DEFAULT = "default"

Hooks = SoftPromptHooks | PrefixHooks | InputPrefixHooks


class AttachedPrompts(nn.ModuleDict):
    """What an attachment adds to a model, kept on the model (``model.prompthooks``),
    as ``torch.nn.utils.parametrize`` keeps its state: the prompts as
    submodules (so ``model.parameters()``, ``to()``, ``train()`` and the
    ``state_dict`` reach them), and the hook objects, the located modules and
    the user's ``requires_grad`` flags as plain attributes. The hooks are bound
    methods of those objects, so ``copy.deepcopy(model)`` and a pickle round
    trip give a model with its own prompts and hooks, attached on its own.
    """

    def __init__(
        self,
        prompts: dict[str, SoftPrompt],
        located: Located,
        bank: PromptBank,
        hooks: list[Hooks],
        flags: dict[str, bool],
    ) -> None:
        super().__init__(prompts)
        self.located = located
        self.bank = bank
        self.hooks = hooks
        self.flags = flags

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        _ATTACHED.add(self)  # a copy or an unpickled model is attached too


#: What is attached, weakly: an attached model the user drops is freed (its
#: hooks and prompts live on it, and go with it).
_ATTACHED: weakref.WeakSet[AttachedPrompts] = weakref.WeakSet()


def _state(model: nn.Module) -> AttachedPrompts | None:
    state = getattr(model, ATTRIBUTE, None)
    return state if isinstance(state, AttachedPrompts) else None


def _refuse_overlaps(model: nn.Module, named: Mapping[str, object]) -> None:
    """One attachment per model, and none on a model that shares modules or
    parameters with an attached one: their hooks and frozen flags would collide,
    and detaching one would undo the other's. Checked before anything changes."""
    own = _state(model)
    if own is not None:
        attached = list(own.keys())
        clash = sorted(set(named) & set(attached))
        what = (
            f"a prompt named {clash[0]!r} is already attached"
            if clash
            else f"prompts {attached} are already attached"
        )
        raise ValueError(
            f"{what} to this {type(model).__name__}. Detach the first attachment "
            "(att.detach(), or ph.attachment(model).detach()) or attach all prompts in one "
            "call: ph.attach(model, {'a': spec_a, 'b': spec_b})"
        )
    for state in list(_ATTACHED):
        other = state.located.model
        if _state(other) is not state:
            continue  # detached (a stale entry)
        relation = _overlap(model, other)
        if relation is not None:
            raise ValueError(
                f"this {type(model).__name__} {relation} an attached "
                f"{type(other).__name__} (prompts {list(state.keys())}). Prompts on "
                "overlapping models would share hooks and frozen flags, and detaching one "
                "would undo the other. Detach that attachment first, or attach to one "
                "model only."
            )


def _overlap(model: nn.Module, attached: nn.Module) -> str | None:
    """How ``model`` overlaps ``attached``, or ``None``."""
    if any(m is model for m in attached.modules()):
        return "is a submodule of"
    if any(m is attached for m in model.modules()):
        return "contains"
    shared = {id(p) for p in attached.parameters()}
    if any(id(p) in shared for p in model.parameters()):
        return "shares parameters with"
    return None


def _prefix_hooks(located: Located, bank: PromptBank) -> PrefixHooks | InputPrefixHooks:
    """The prefix mechanism the model's attention sites take (see ``AttentionSite.prefix_in``)."""
    kinds = {site.prefix_in for site in located.sites}
    if kinds == {"inputs"}:
        return InputPrefixHooks(located, bank)
    if kinds <= {"cache", "projections"}:  # PrefixHooks serves both (DistilBERT: projections)
        return PrefixHooks(located, bank)
    raise ValueError(
        f"locator {located.locator!r} mixes attention sites whose prefix enters through the "
        "cache with sites whose prefix enters through the key/value inputs; one prefix "
        "needs sites of one kind"
    )


def _build(prompt: PromptLike, located: Located) -> SoftPrompt:
    if isinstance(prompt, SoftPrompt):
        prompt.check_fits(located)
        return prompt
    if isinstance(prompt, PromptSpec):
        built = prompt.build(located)
        built.check_fits(located)
        return built
    raise TypeError(
        f"expected a prompt spec such as ph.PromptTuning(...) or a trained prompt, got {prompt!r}"
    )


class Attachment:
    """A handle on the prompts attached to one model. ``ph.attach`` makes one;
    ``ph.attachment(model)`` gives one for a model that is attached already (a
    deep copy or an unpickled model, say). Its state lives on the model."""

    def __init__(self, model: nn.Module, prompts: Prompts, *, strip: bool = True) -> None:
        named = dict(prompts) if isinstance(prompts, Mapping) else {DEFAULT: prompts}
        if not named:
            raise ValueError("attach needs at least one prompt")
        _refuse_overlaps(model, named)
        if hasattr(model, ATTRIBUTE):
            raise ValueError(f"the model already has an attribute {ATTRIBUTE!r}; cannot attach")
        # Everything that can fail happens before the model is touched.
        located = locate(model)
        device = located.embedding.weight.device
        built = {name: _build(p, located).to(device) for name, p in named.items()}
        bank = PromptBank(built, located.vocab_size)
        kinds = {p.kind for p in built.values()}
        hooks: list[Hooks] = []
        if "tokens" in kinds:
            hooks.append(SoftPromptHooks(located, bank, strip_outputs=strip))
        if "prefix" in kinds:
            hooks.append(_prefix_hooks(located, bank))
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        self._state = AttachedPrompts(built, located, bank, hooks, flags)
        self.model = model
        # From here on the model changes: a failure at any step undoes every
        # earlier one and raises the original error.
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            # The prompts follow the model's mode from here on (train()/eval() reach
            # registered children); new and loaded prompts start in the model's.
            self._state.train(model.training)
            model.add_module(ATTRIBUTE, self._state)
            for hook in hooks:
                hook.install()
        except BaseException:
            self._undo()
            raise
        _ATTACHED.add(self._state)

    @classmethod
    def of(cls, model: nn.Module) -> Attachment:
        """The attachment a model carries (see ``ph.attachment``)."""
        state = _state(model)
        if state is None:
            raise ValueError(
                f"no prompts are attached to this {type(model).__name__}: use ph.attach(model, ...)"
            )
        handle = cls.__new__(cls)
        handle._state, handle.model = state, model
        return handle

    @property
    def attached(self) -> bool:
        return _state(self.model) is self._state

    @property
    def prompts(self) -> nn.ModuleDict:
        """The attached prompts by name (registered on the model as ``prompthooks``)."""
        return self._state

    @property
    def located(self) -> Located:
        return self._state.located

    @property
    def bank(self) -> PromptBank:
        return self._state.bank

    @property
    def names(self) -> list[str]:
        return list(self.prompts.keys())

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable prompt parameters."""
        return self.prompts.parameters()

    def virtual_ids(self, name: str = DEFAULT) -> list[int]:
        """Ids that stand for this prompt's rows; place them anywhere in ``input_ids``."""
        return self.bank.virtual_ids(name)

    @contextmanager
    def use(
        self, name: str | Sequence[str] | None = None, *, template: bool | None = None
    ) -> Iterator[None]:
        """Select which attached prompt forward calls insert: one name for the
        whole batch, or a list with one name per row (a mixed batch; rows
        repeated by ``generate`` for beams follow their row). ``None`` keeps
        the current selection.

        ``template`` says whether inputs already hold virtual ids (``True``:
        nothing is inserted) or never do (``False``: the prompt is inserted).
        Left ``None``, each call looks at its ``input_ids`` to decide, which
        reads them on the host; under ``torch.compile`` it cannot, so there an
        undeclared input is taken to hold none and checked on the device.
        """
        selected, declared = self.bank.selected, self.bank.template
        if name is not None:
            names = [name] if isinstance(name, str) else list(name)
            if not names:
                raise ValueError("att.use() needs a prompt name or a non-empty list of names")
            for n in names:
                if n not in self.bank.prompts:
                    raise KeyError(f"no prompt named {n!r}; attached: {self.names}")
            selected = names[0] if len(set(names)) == 1 else tuple(names)
        if template is not None and not isinstance(template, bool):
            raise TypeError(f"template must be True, False or None, got {template!r}")
        with self.bank.choose(selected, declared if template is None else template):
            yield

    def detach(self) -> None:
        """Remove every hook and the prompt module; restore ``requires_grad``. Idempotent."""
        if self.attached:
            self._undo()

    def _undo(self) -> None:
        """Undo whatever of the attach happened (all of it, or the steps before a failure)."""
        state = self._state
        for hook in state.hooks:
            hook.remove()
        if _state(self.model) is state:
            delattr(self.model, ATTRIBUTE)
        for name, p in self.model.named_parameters():
            p.requires_grad_(state.flags.get(name, p.requires_grad))
        _ATTACHED.discard(state)

    def export(self) -> None:
        """Replace every prompt by the plain tables it produces (dropping a
        prefix's MLP or a P-tuning encoder). Outputs stay identical; the
        parameters change, so build the optimizer after exporting."""
        for name, prompt in list(self.prompts.items()):
            assert isinstance(prompt, SoftPrompt)
            exported = prompt.export()
            if exported is not prompt:
                self._state[name] = exported
                self.bank.prompts[name] = exported

    def save_peft(self, directory: str | Path, *, task_type: str | None = None) -> None:
        """Write the selected prompt as a PEFT adapter directory that
        ``peft.PeftModel.from_pretrained(model, directory)`` loads.

        ``task_type`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...) defaults to the one
        that matches the model's class.
        """
        from .io import save_peft

        name = self.bank.active()
        save_peft(self.bank.prompts[name], directory, self.located, task_type=task_type)

    def save(self, path: str | Path, *, allow_non_finite: bool = False) -> None:
        """Write the prompts to one safetensors file (see ``ph.load``). Prompts
        holding NaN or inf are refused (the file is left as it was) unless
        ``allow_non_finite`` is set."""
        from .io import save

        prompts = dict(self.prompts.items())
        save(prompts, path, self.located, allow_non_finite=allow_non_finite)  # type: ignore[arg-type]

    def __enter__(self) -> Attachment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<Attachment {self.names} to {type(self.model).__name__} ({state})>"


def attachment(model: nn.Module) -> Attachment:
    """The attachment ``model`` carries: for a model attached elsewhere, a deep
    copy of an attached model, or one loaded with ``torch.load``. Raises
    ``ValueError`` if none is attached."""
    return Attachment.of(model)


def attach(model: nn.Module, prompts: Prompts, *, strip: bool = True) -> Attachment:
    """Attach prompt(s) to ``model`` with hooks; returns an ``Attachment``.

    ``prompts`` is a spec (``ph.PromptTuning(...)``), a trained prompt (from
    ``ph.load`` / ``ph.load_peft``) or a ``{name: spec_or_prompt}`` mapping.
    With ``strip=False`` outputs keep the virtual positions.
    """
    return Attachment(model, prompts, strip=strip)


P = ParamSpec("P")
R = TypeVar("R")


def tune(
    prompts: Prompts,
    *,
    model: str = "model",
    save_to: str | Path | None = None,
    strip: bool = True,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate training code: ``prompts`` are attached to the function's
    argument called ``model`` for the duration of each call, and saved to
    ``save_to`` when the call returns normally. The body stays unchanged."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)
        if model not in signature.parameters:
            raise TypeError(f"{fn.__name__} has no parameter named {model!r} to attach to")

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()  # a model given as the parameter's default
            target = bound.arguments[model]
            if not isinstance(target, nn.Module):
                raise TypeError(
                    f"@ph.tune attaches to {fn.__name__}'s argument {model!r}, which is "
                    f"{type(target).__name__}, not a torch.nn.Module: pass the model"
                )
            with attach(target, prompts, strip=strip) as att:
                result = fn(*args, **kwargs)
                if save_to is not None:
                    att.save(save_to)
            return result

        return wrapper

    return decorate
