"""What a locator is and what it returns.

A locator knows one architecture. It answers two questions about a model
without changing it: "is this mine?" (`matches`) and "where do prompts go?"
(`locate`). Everything the hooks need to know about an architecture lives in
the `Located` record, so the rest of the library never imports a model class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .conventions import CACHE_NAMES, MASK_NAMES, CallNames, named_parameters

Role = Literal["self", "enc_self", "dec_self", "cross"]


@dataclass(frozen=True)
class AttentionSite:
    """One attention module that a prefix can be placed in front of.

    Attributes:
        module: the attention module; a forward pre-hook on it adds the prefix.
        role: ``self`` (decoder-only or encoder-only self-attention),
            ``enc_self`` / ``dec_self`` (encoder / decoder self-attention of an
            encoder-decoder model) or ``cross`` (decoder reading the encoder).
        layer: the module's ``layer_idx`` in the cache it updates.
        num_kv_heads, head_dim: shape of one token's keys (and values).
        causal: each query sees only earlier keys. Used when transformers
            passes no mask at all (sdpa's ``is_causal`` shortcut), which a
            prefix makes wrong, so the hook must build one.
        mask_arg, cache_arg: names of the forward keyword arguments that hold
            the 4-D attention mask and the key/value cache. Left ``None``,
            they are read from the module's forward signature (see
            ``conventions``); a name the forward does not take stays ``None``
            and attaching a prefix is refused.
        prefix_in: where the prefix enters. ``cache``: as keys and values,
            through the cache argument (transformers attention modules).
            ``inputs``: as ``num_kv_heads * head_dim`` wide vectors in front of
            the module's ``key`` and ``value`` inputs, before their projections
            (``torch.nn.MultiheadAttention``, which takes no cache); with
            invertible projections this reaches any key and value.
            ``projections``: as rows of ``key_proj`` / ``value_proj``'s outputs,
            for attention modules that take no cache and compute keys, values
            and queries from one ``hidden_states`` input (DistilBERT): the
            module gets P leading input rows whose key and value projections
            are replaced by the prefix, and their P query rows are dropped
            from its output.
        key_proj, value_proj: the key and value projections (``projections`` only).
        window: a sliding-window layer's window: a query at cache index ``q``
            sees keys ``k`` with ``q - k < window`` (transformers counts the
            cache, padding included). The prefix sits at the front of the
            cache, so late queries stop seeing it, as they do when the prefix
            is in a real cache (``generate``). ``None``: no window.
    """

    module: nn.Module
    role: Role
    layer: int
    num_kv_heads: int
    head_dim: int
    causal: bool = True
    mask_arg: str | None = None
    cache_arg: str | None = None
    prefix_in: Literal["cache", "inputs", "projections"] = "cache"
    key_proj: nn.Module | None = None
    value_proj: nn.Module | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        # Read once here, at locate time: the hooks use these names on every call.
        if self.prefix_in == "inputs":  # nn.MultiheadAttention: torch's own, stable names
            return
        names = named_parameters(self.module)
        if self.mask_arg is None:
            mask = next((n for n in MASK_NAMES if n in names), None)
            object.__setattr__(self, "mask_arg", mask)
        if self.cache_arg is None and self.prefix_in == "cache":
            cache = next((n for n in CACHE_NAMES if n in names), None)
            object.__setattr__(self, "cache_arg", cache)


@dataclass(frozen=True)
class PositionTable:
    """A learned position embedding that numbers its stack's positions itself
    (from the sequence length, or the length of the cache it is given) and
    takes no position ids from the stack (BART).

    A prefix changes that numbering: in a cache it counts as P earlier tokens,
    without one it counts as nothing. A forward hook on ``module`` replaces its
    output with ``lookup`` of the positions ``shift_positions`` asks for, so a
    call with a cache, one without and a decode step all agree.

    Attributes:
        module: the position embedding.
        role: the stack it belongs to: ``self`` / ``enc_self`` for the input
            stack, ``dec_self`` for a decoder.
        lookup: position ids ``(B, L)`` -> embeddings ``(B, L, D)``, as the
            module computes them.
    """

    module: nn.Module
    role: Role
    lookup: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Located:
    """References to the existing modules of one model that prompts attach to.

    Attributes:
        locator: name of the locator that produced this record.
        model: the module the user calls (labels enter and outputs leave here).
        embedding: the token embedding that reads the input ids.
        input_stack: the module whose forward takes ``input_ids``,
            ``attention_mask`` and friends; soft prompts are inserted here.
        encoder_mask_readers: modules that receive the input stack's output
            together with an ``encoder_attention_mask`` (a T5 decoder).
        sites: attention modules, for prefix methods.
        max_positions: longest sequence the model can embed, or ``None``.
        cls_first: the first token is a summary token (``[CLS]``) that must
            stay first; prompts go right after it.
        is_encoder_decoder: labels belong to the decoder and are left alone.
        shifted_labels: the model's loss predicts ``labels[:, t + 1]`` from
            position ``t`` (a causal language-model head). A prompt in front of
            a row's first token would make that token's label a new target;
            it is masked, so the loss keeps the targets of the user's batch.
        first_position: the position id of a row's first token. Positions the
            hooks compute from the attention mask start here (RoBERTa numbers
            its positions from ``padding_idx + 1``).
        position_tables: position embeddings whose stacks take no position
            ids, renumbered by the prefix hooks (see ``PositionTable``).
        pad_slots_last: in a batch whose rows get prompts of different lengths,
            the shorter rows' pad slots go after the row, not in front. Decoder-only
            models pad in front (generation appends at the end); a right-padded
            causal model that does not generate (a plain PyTorch one) needs them
            last: a pad slot in front is a causal query with no key to attend to.
    """

    locator: str
    model: nn.Module
    embedding: nn.Embedding
    input_stack: nn.Module
    encoder_mask_readers: tuple[nn.Module, ...]
    sites: tuple[AttentionSite, ...]
    max_positions: int | None
    cls_first: bool = False
    is_encoder_decoder: bool = False
    shifted_labels: bool = False
    first_position: int = 0
    position_tables: tuple[PositionTable, ...] = ()
    pad_slots_last: bool = False
    #: How the model, the input stack and each encoder-mask reader take their
    #: cache, mask and positions, read from their signatures (``CallNames``).
    calls: tuple[tuple[nn.Module, CallNames], ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # Read once, at locate time (and again by ``dataclasses.replace``).
        modules = dict.fromkeys([self.model, self.input_stack, *self.encoder_mask_readers])
        object.__setattr__(self, "calls", tuple((m, CallNames.of(m)) for m in modules))

    def call_names(self, module: nn.Module) -> CallNames:
        """The argument names ``module`` (the model, its input stack or an
        encoder-mask reader) takes its cache, mask and positions under."""
        for known, names in self.calls:
            if known is module:
                return names
        return CallNames.of(module)

    @property
    def hidden_size(self) -> int:
        return int(self.embedding.embedding_dim)

    @property
    def vocab_size(self) -> int:
        """Ids at or above this number are virtual tokens."""
        return int(self.embedding.num_embeddings)

    def fingerprint(self) -> dict[str, Any]:
        """What a saved prompt records about the model it was trained for, so
        loading it into another model is refused with the shapes that differ."""
        return {
            "architecture": type(self.model).__name__,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "sites": [[s.role, s.layer, s.num_kv_heads, s.head_dim] for s in self.sites],
        }

    def __str__(self) -> str:
        names = {id(m): n for n, m in self.model.named_modules()}

        def name(m: nn.Module) -> str:
            return names.get(id(m), "?") or "<model>"

        lines = [
            f"{type(self.model).__name__} (located by {self.locator!r})",
            f"  token embedding : {name(self.embedding)} ({self.vocab_size} x {self.hidden_size})",
            f"  input stack     : {name(self.input_stack)}",
        ]
        lines += [f"  call names      : {name(m)}: {names}" for m, names in self.calls]
        if self.encoder_mask_readers:
            readers = ", ".join(name(m) for m in self.encoder_mask_readers)
            lines.append(f"  encoder masks   : {readers}")
        lines.append(f"  max positions   : {self.max_positions}")
        lines.append(f"  [CLS] first     : {self.cls_first}")
        if self.shifted_labels:
            lines.append("  shifted labels  : True (a causal LM head)")
        if self.first_position:
            lines.append(f"  first position  : {self.first_position}")
        if self.position_tables:
            tables = ", ".join(name(t.module) for t in self.position_tables)
            lines.append(f"  position tables : {tables}")
        lines.append(f"  attention sites : {len(self.sites)}")
        for s in self.sites:
            if s.prefix_in == "inputs":  # nn.MultiheadAttention: masks are the model's own
                lines.append(
                    f"    {s.role:<8} layer {s.layer:>2}  {name(s.module)}  "
                    f"prefix in key/value inputs, width={s.num_kv_heads * s.head_dim}"
                )
                continue
            lines.append(
                f"    {s.role:<8} layer {s.layer:>2}  {name(s.module)}  "
                f"kv_heads={s.num_kv_heads} head_dim={s.head_dim}"
                + ("" if s.causal else "  (bidirectional)")
                + ("" if s.window is None else f"  window={s.window}")
                + _kwarg_names(s)
            )
        return "\n".join(lines)


def _kwarg_names(site: AttentionSite) -> str:
    """The keyword names the site's forward takes its cache and mask under."""
    names = [f"mask={site.mask_arg}"]
    if site.prefix_in == "cache":
        names.insert(0, f"cache={site.cache_arg}")
    return "  " + " ".join(names)


class Locator:
    """Base class for architecture locators.

    Subclass it, set ``name``, implement ``matches`` and ``locate``, and
    decorate the class with ``prompthooks.register_locator``. ``locate`` must
    only return references to modules that already exist.

    A locator whose ``matches`` checks a model's classes sets nothing more.
    One that recognises a layout shared by many classes (attribute names,
    module types) sets ``structural = True``: it is tried after every
    class-based locator, and a match is logged (logger ``prompthooks``, level
    INFO) so a user can see which guess was taken.
    """

    name: ClassVar[str] = "unnamed"
    structural: ClassVar[bool] = False

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def locate(self, model: nn.Module) -> Located:
        raise NotImplementedError
