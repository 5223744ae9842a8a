"""Hooks that put soft prompts into a model's input and take them out of its output.

One forward call of a prompted model goes through these, in order. The first
one opens the call's frame (``calls``), which the others fill and read; the
hook objects keep nothing between calls.

1. ``model_pre`` on the user-facing model: token labels get ``-100`` where
   the virtual tokens will be (the loss never scores a virtual token).
2. ``stack_pre`` on the input stack: virtual ids are inserted into
   ``input_ids`` before each row's first real token, and the attention mask,
   positions and token types are lengthened to match. On a decode step (the
   cache already holds the prompt) only the mask and positions are adjusted.
3. ``embed_pre`` / ``embed_post`` on the token embedding: virtual ids are
   looked up in a table of the prompts the call uses instead of the vocabulary.
4. ``encoder_mask_pre`` on decoders that read the encoder output (T5): their
   ``encoder_attention_mask`` is widened to the prompted encoder length.
5. ``model_post`` on the user-facing model: virtual positions are removed from
   per-position outputs, so the user sees their own sequence length. When no
   per-token labels were lengthened, a decoder-only model's input stack
   strips its own outputs instead (``stack_post``), so heads that index them
   in the user's view (the last non-pad token of a sequence classifier, the
   answer span of a question-answering head) read the right positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..kernels import splice_tokens
from ..locators.base import Located
from ..locators.conventions import read_cache
from .arguments import Kwargs, bind_kwargs, cache_length
from .bank import PromptBank
from .caches import make_room_everywhere, prefix_width, recall, remember
from .calls import Frames
from .checks import not_applied
from .layout import (
    insert,
    insert_per_row,
    insertion_points,
    positions_from_mask,
    shift_positions,
    shift_positions_per_row,
    strip,
    strip_per_row,
)
from .masks import causal_4d, padding_from_4d

_TEMPLATE_WITHOUT_IDS = (
    "att.use(template=True) was declared but input_ids hold no virtual ids: place "
    "att.virtual_ids(name) in the input, or drop template=True"
)
_IDS_WITHOUT_TEMPLATE = (
    "input_ids hold virtual ids (a template) but the call did not declare it: under "
    "torch.compile, or with att.use(template=False), wrap the call in "
    "`with att.use(template=True):`"
)


@dataclass(frozen=True)
class Insertion:
    """Where one call's virtual tokens went: what ``model_post`` undoes."""

    at: torch.Tensor  # (B,) first virtual position of each row
    count: int  # positions added to every row
    length: int  # lengthened sequence length
    at_front: bool  # every row starts with its prompt: stripping is a free view
    mixed: Mixed | None = None  # rows with prompts of different lengths


@dataclass(frozen=True)
class Mixed:
    """A batch whose rows use different prompts: row b inserts ``counts[b]``
    virtual ids (``fill[b]``) and ``width - counts[b]`` masked pad slots."""

    counts: torch.Tensor  # (B,)
    fill: torch.Tensor  # (B, width) virtual ids, 0 beyond a row's count
    width: int
    pad_front: bool
    names: list[str]  # the token prompts the rows use, in id order


@dataclass
class TokenCall:
    """What one call's token hooks hand each other (see ``calls``)."""

    insertion: Insertion | None = None
    # ``model_pre`` lengthened per-token labels: the head's loss needs the
    # long outputs, so they are stripped after the head, not before it.
    labels_lengthened: bool = False
    embed_ids: torch.Tensor | None = None
    # Set by ``stack_pre``, which knows whether the ids hold virtual tokens,
    # so ``embed_pre`` need not look (a host sync). None: not known.
    ids_hold_virtual: bool | None = None
    # The token prompts the call's ids use, in id order (None: not known).
    table_names: list[str] | None = None


class SoftPromptHooks:
    """The hook functions for one attachment. They keep no state between calls:
    each call's lives in its frame (``calls``); what a cache holds, on the cache."""

    def __init__(self, located: Located, bank: PromptBank, strip_outputs: bool) -> None:
        self.located = located
        self.bank = bank
        self.strip_outputs = strip_outputs
        self.vocab_size = located.vocab_size
        self.stack_takes_positions = located.call_names(located.input_stack).positions is not None
        self.frames: Frames[TokenCall] = Frames()
        self._handles: list[RemovableHandle] = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def install(self) -> None:
        loc = self.located
        # One handle at a time: a registration that fails leaves the earlier
        # ones in ``_handles``, so ``remove`` undoes a partial install.
        # Post-hooks that close a frame run also when the forward raises.
        handles = self._handles
        handles.append(loc.input_stack.register_forward_pre_hook(self.stack_pre, with_kwargs=True))
        handles.append(loc.embedding.register_forward_pre_hook(self.embed_pre))
        handles.append(loc.embedding.register_forward_hook(self.embed_post, always_call=True))
        handles.append(loc.input_stack.register_forward_hook(self.stack_post, always_call=True))
        if loc.model is not loc.input_stack:
            handles.append(loc.model.register_forward_pre_hook(self.model_pre, with_kwargs=True))
            handles.append(loc.model.register_forward_hook(self.model_post, always_call=True))
        for reader in loc.encoder_mask_readers:
            handles.append(
                reader.register_forward_pre_hook(self.encoder_mask_pre, with_kwargs=True)
            )

    # -- deciding what a call needs ------------------------------------------------

    def _tokens_active(self) -> bool:
        """Some selected prompt enters through the embedding (not a prefix)."""
        return self.bank.selects("tokens")

    def _fresh_insertion(self, kw: Kwargs, past: int) -> tuple[str, torch.Tensor] | None:
        """For a call that starts a sequence: (prompt name, insertion points), or
        ``None`` if nothing is inserted (a decode step, or a template input)."""
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None or past > 0:
            return None
        if ids is not None and self._is_template(ids):
            return None  # the user placed virtual ids themselves
        mask = kw.get("attention_mask")
        if mask is not None and mask.ndim == 4:
            mask = padding_from_4d(mask, x.shape[1])
        if mask is not None and mask.ndim != 2:
            raise ValueError(
                f"prompthooks needs a 2-D (batch, length) attention_mask, got shape "
                f"{tuple(mask.shape)}; pass the padding mask and let the model build the rest"
            )
        name = self.bank.active()
        at = insertion_points(mask, x.shape[0], self.located.cls_first, x.device)
        return name, at

    def _is_template(self, ids: torch.Tensor) -> bool:
        """Do the ids already hold virtual ids (a template)? Declared with
        ``att.use(template=...)``, else looked at: a host sync, which a
        ``torch.compile`` graph cannot hold, so there an undeclared input is
        taken to hold none and checked on the device instead."""
        declared = self.bank.template
        if declared is None and not torch.compiler.is_compiling():
            return bool((ids >= self.vocab_size).any())
        holds = (ids >= self.vocab_size).any()
        if declared:
            torch._assert_async(holds, _TEMPLATE_WITHOUT_IDS)
            return True
        torch._assert_async(~holds, _IDS_WITHOUT_TEMPLATE)
        return False

    def _mixed(self, batch: int, device: torch.device) -> Mixed | None:
        """The per-row plan of a mixed batch (``att.use([...])``), else ``None``."""
        rows = self.bank.per_row(batch)
        if rows is None:
            return None
        # Rows whose prompt is a prefix insert nothing here (the prefix hooks serve them).
        ids = [self.bank.virtual_ids(n) if n in self.bank.starts else [] for n in rows]
        width = max(len(r) for r in ids)
        fill = torch.tensor([r + [0] * (width - len(r)) for r in ids], device=device)
        counts = torch.tensor([len(r) for r in ids], device=device)
        # Pad slots go where the model's own padding goes: in front for decoder-only
        # models (generation appends at the end), at the end for encoders.
        pad_front = not (self.located.is_encoder_decoder or self.located.cls_first)
        return Mixed(counts, fill, width, pad_front, self.bank.token_names(rows))

    def _check_length(self, length: int) -> None:
        limit = self.located.max_positions
        if limit is not None and length > limit:
            raise ValueError(
                f"input too long: with the prompt the sequence has {length} positions, but "
                f"{type(self.located.model).__name__} embeds at most {limit}. Shorten the input "
                "(truncate to max_positions - num_virtual_tokens) or use fewer virtual tokens."
            )

    # -- hooks ---------------------------------------------------------------------

    def model_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Any:
        # A frame at the model's level is needed only when ``model_post`` must strip
        # the outputs: an encoder's (in the model's output) or a head's that read
        # lengthened labels. Otherwise (a decode step, say) the stack opens its own
        # frame and strips before the head.
        if self.located.is_encoder_decoder:
            self.frames.open("model", TokenCall())
            return None  # labels belong to the decoder
        if not self._tokens_active():
            return None  # no tokens are inserted
        kw = bind_kwargs(module, args, kwargs)
        labels = kw.get("labels")
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if labels is None or x is None or labels.ndim != 2 or labels.shape != x.shape[:2]:
            return None  # no labels, or per-sequence labels: nothing to align
        cache = read_cache(kw, self.located.call_names(module).cache)
        plan = self._fresh_insertion(kw, cache_length(cache))
        if plan is None:
            return None
        name, at = plan
        mixed = self._mixed(x.shape[0], x.device)
        if mixed is not None:
            labels = self._keep_targets(labels, at, mixed.counts)
            fill = torch.full_like(mixed.fill, -100)
            kw["labels"] = insert_per_row(labels, at, mixed.counts, fill, -100, mixed.pad_front)
        else:
            count = self.bank.prompts[name].num_virtual_tokens
            labels = self._keep_targets(labels, at, None)
            kw["labels"] = insert(labels, at, labels.new_full((count,), -100))
        self.frames.open("model", TokenCall(labels_lengthened=True))
        return (), kw

    def _keep_targets(
        self, labels: torch.Tensor, at: torch.Tensor, counts: torch.Tensor | None
    ) -> torch.Tensor:
        """Keep the loss on the targets of the user's batch. A causal LM loss
        predicts ``labels[:, t + 1]`` from position ``t``; a prompt in front of
        column 0 would give that label a predecessor and make it a new target.
        It is masked, so the loss has exactly the targets it has without the
        prompt: token counts made from the user's labels (``Trainer``'s
        ``num_items_in_batch``) stay right, and for rows that start at column
        0 it equals the loss computed from the stripped logits."""
        if not self.located.shifted_labels:
            return labels
        first = at == 0 if counts is None else (at == 0) & (counts > 0)
        column = labels[:, :1].masked_fill(first.unsqueeze(1), -100)
        return torch.cat([column, labels[:, 1:]], dim=1)

    def stack_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Any:
        # Inside the model's call the stack fills the model's frame; called on
        # its own (``generate`` runs the T5 encoder so) it opens its own.
        frame = self.frames.current()
        if frame is None or frame.opener != "model":
            frame = self.frames.open("stack", TokenCall())
        call = frame.state
        kw = bind_kwargs(module, args, kwargs)
        call.insertion = None
        call.ids_hold_virtual = None
        if not self._tokens_active():
            call.ids_hold_virtual = False  # ids the embedding cannot look up fail there
            return None
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            return None
        cache = read_cache(kw, self.located.call_names(module).cache)
        past = cache_length(cache)
        if past > 0:
            return self._continue(kw, cache, past, x.shape[1])
        plan = self._fresh_insertion(kw, past)
        call.ids_hold_virtual = ids is not None  # inserted now, or placed by the user
        if plan is None:  # template: ids already in place
            if ids is not None and not torch.compiler.is_compiling():
                call.table_names = self.bank.names_of_ids(ids)
            self._check_length(x.shape[1])
            if cache is not None:
                remember(cache, "inserted", 0)
            mask = kw.get("attention_mask")
            if kw.get("position_ids") is None and mask is not None and self.stack_takes_positions:
                # padding changes nothing
                kw["position_ids"] = positions_from_mask(mask, self.located.first_position)
                return (), kw
            return None
        name, at = plan
        mixed = self._mixed(x.shape[0], x.device)
        if mixed is not None:
            return self._insert_mixed(call, kw, x, at, mixed, cache)
        prompt = self.bank.prompts[name]
        count = prompt.num_virtual_tokens
        self._check_length(x.shape[1] + count)
        call.table_names = [name]
        if ids is not None:
            kw["input_ids"] = insert(ids, at, self.bank.virtual_ids_tensor(name, ids.device))
        else:
            kw["inputs_embeds"] = insert(x, at, prompt.table())
        # A static cache gets P more slots, whatever form the mask takes (``generate``
        # drops an all-ones mask: unpadded rows bring none). No-op for growing caches.
        make_room_everywhere(cache, count)
        mask = kw.get("attention_mask")
        if mask is not None and mask.ndim == 4:  # generate with a static cache
            lengthened = insert(padding_from_4d(mask, x.shape[1]), at, mask.new_ones(count))
            kw["attention_mask"] = causal_4d(lengthened, mask, mask.shape[-1] + count, 0)
            mask = lengthened
        elif mask is not None:
            kw["attention_mask"] = mask = insert(mask, at, mask.new_ones(count))
        positions = kw.get("position_ids")
        if positions is not None:
            kw["position_ids"] = shift_positions(positions, at, count)
        elif mask is not None and self.stack_takes_positions:
            kw["position_ids"] = positions_from_mask(mask, self.located.first_position)
        token_types = kw.get("token_type_ids")
        if token_types is not None:
            kw["token_type_ids"] = insert(token_types, at, token_types.new_zeros(count))
        labels = kw.get("labels")
        if labels is not None and labels.ndim == 2 and labels.shape == x.shape[:2]:
            labels = self._keep_targets(labels, at, None)
            kw["labels"] = insert(labels, at, labels.new_full((count,), -100))
        if cache is not None:
            remember(cache, "inserted", count)
        at_front = not self.located.cls_first and (mask is None or self._all_zero(at))
        call.insertion = Insertion(at, count, x.shape[1] + count, at_front)
        return (), kw

    def _insert_mixed(
        self,
        call: TokenCall,
        kw: Kwargs,
        x: torch.Tensor,
        at: torch.Tensor,
        mixed: Mixed,
        cache: Any,
    ) -> Any:
        """``stack_pre`` for a mixed batch: each row gets its own prompt."""
        self._check_length(x.shape[1] + mixed.width)
        counts, width, front = mixed.counts, mixed.width, mixed.pad_front
        call.table_names = mixed.names
        if kw.get("input_ids") is not None:
            kw["input_ids"] = insert_per_row(x, at, counts, mixed.fill, 0, front)
        else:
            fill, table = self.bank.lookup(mixed.fill, mixed.names)
            # picked in at least fp32: gradients add up there
            table = table.to(torch.promote_types(table.dtype, torch.float32))
            vectors = table[(fill - self.vocab_size).clamp(min=0)]
            kw["inputs_embeds"] = insert_per_row(x, at, counts, vectors, 0.0, front)
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        make_room_everywhere(cache, width)  # a static cache's slots (see ``stack_pre``)
        if mask.ndim == 4:  # generate with a static cache
            lengthened = self._lengthen_mask(padding_from_4d(mask, x.shape[1]), at, mixed)
            kw["attention_mask"] = causal_4d(lengthened, mask, mask.shape[-1] + width, 0)
            mask = lengthened
        else:
            kw["attention_mask"] = mask = self._lengthen_mask(mask, at, mixed)
        positions = kw.get("position_ids")
        if positions is not None:
            kw["position_ids"] = shift_positions_per_row(positions, at, counts, width, front)
        elif self.stack_takes_positions:
            kw["position_ids"] = positions_from_mask(mask, self.located.first_position)
        token_types = kw.get("token_type_ids")
        if token_types is not None:
            zeros = torch.zeros_like(mixed.fill)
            kw["token_type_ids"] = insert_per_row(token_types, at, counts, zeros, 0, front)
        labels = kw.get("labels")
        if labels is not None and labels.ndim == 2 and labels.shape == x.shape[:2]:
            labels = self._keep_targets(labels, at, counts)
            fill = torch.full_like(mixed.fill, -100)
            kw["labels"] = insert_per_row(labels, at, counts, fill, -100, front)
        if cache is not None:
            remember(cache, "inserted", mixed)
        call.insertion = Insertion(at, width, x.shape[1] + width, False, mixed)
        return (), kw

    @staticmethod
    def _all_zero(at: torch.Tensor) -> bool:
        """Every row's prompt goes first, so stripping can be a view. Looking is a
        host sync, so compiled graphs skip it and strip by gathering."""
        return not torch.compiler.is_compiling() and not bool(at.any())

    @staticmethod
    def _lengthen_mask(mask: torch.Tensor, at: torch.Tensor, mixed: Mixed) -> torch.Tensor:
        ones = torch.ones_like(mixed.fill, dtype=mask.dtype)
        return insert_per_row(mask, at, mixed.counts, ones, 0, mixed.pad_front)

    def _continue(self, kw: Kwargs, cache: Any, past: int, new: int) -> Any:
        """A decode step: the cache holds the prompt; shift mask and positions to match."""
        self._check_length(past + new)
        mask = kw.get("attention_mask")
        count = recall(cache, "inserted")
        if isinstance(count, Mixed):
            return self._continue_mixed(kw, count, past, new, cache)
        if count is None:  # a cache we did not fill: trust the mask's length
            count = max(past + new - mask.shape[1], 0) if mask is not None else 0
        if count == 0:
            return None
        if mask is not None and mask.ndim == 4:  # generate with a static cache
            valid = padding_from_4d(mask, mask.shape[-1])  # keys valid in the user's view
            at = insertion_points(valid, valid.shape[0], self.located.cls_first, valid.device)
            lengthened = insert(valid, at, valid.new_ones(count))[:, : mask.shape[-1]]
            kw["attention_mask"] = causal_4d(lengthened, mask, mask.shape[-1], past)
            mask = None
        elif mask is not None and mask.shape[1] == past + new - count:
            at = insertion_points(mask, mask.shape[0], self.located.cls_first, mask.device)
            kw["attention_mask"] = mask = insert(mask, at, mask.new_ones(count))
        positions = kw.get("position_ids")
        if positions is not None:
            kw["position_ids"] = positions + count
        elif mask is not None and self.stack_takes_positions:
            kw["position_ids"] = positions_from_mask(mask, self.located.first_position)[:, -new:]
        return (), kw

    def _continue_mixed(
        self, kw: Kwargs, mixed: Mixed, past: int, new: int, cache: Any = None
    ) -> Any:
        mask = kw.get("attention_mask")
        user = past + new - mixed.width - prefix_width(cache)
        if mask is None:  # generate drops an all-ones mask; the pad slots must stay masked
            counts = mixed.counts  # (B,)
            mask = torch.ones(counts.shape[0], user, dtype=torch.long, device=counts.device)
        if mask.ndim == 4:  # generate with a static cache
            valid = padding_from_4d(mask, mask.shape[-1])
            at = insertion_points(valid, valid.shape[0], self.located.cls_first, valid.device)
            lengthened = self._lengthen_mask(valid, at, mixed)[:, : mask.shape[-1]]
            kw["attention_mask"] = causal_4d(lengthened, mask, mask.shape[-1], past)
            mask = None
        elif mask.shape[1] == user:
            at = insertion_points(mask, mask.shape[0], self.located.cls_first, mask.device)
            kw["attention_mask"] = mask = self._lengthen_mask(mask, at, mixed)
        positions = kw.get("position_ids")
        if positions is not None:
            kw["position_ids"] = positions + mixed.counts.unsqueeze(1)
        elif mask is not None and self.stack_takes_positions:
            kw["position_ids"] = positions_from_mask(mask, self.located.first_position)[:, -new:]
        return (), kw

    def embed_pre(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        frame = self.frames.current()
        if frame is None:  # the embedding called on its own: a frame of its own
            frame = self.frames.open("embedding", TokenCall())
        call = frame.state
        ids = args[0]
        holds, call.ids_hold_virtual = call.ids_hold_virtual, None
        if holds is None:  # the embedding was called on its own, not through the stack
            # A compiled graph cannot look; ids it cannot look up fail in the embedding.
            holds = not torch.compiler.is_compiling() and bool((ids >= self.vocab_size).any())
        if not holds:
            call.embed_ids = None
            return None
        virtual = ids >= self.vocab_size
        call.embed_ids = ids
        return (ids.masked_fill(virtual, 0), *args[1:])

    def embed_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        frame = self.frames.current()
        if frame is None:
            return None
        call = frame.state
        ids, call.embed_ids = call.embed_ids, None
        if frame.opener == "embedding":
            self.frames.remove(frame)
        if ids is None or output is None:
            return None
        names = call.table_names
        if names is None and not torch.compiler.is_compiling():  # ids the stack did not place
            names = self.bank.names_of_ids(ids)
        ids, table = self.bank.lookup(ids, names)
        return splice_tokens(output, ids, table, self.vocab_size)

    def encoder_mask_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Any:
        kw = bind_kwargs(module, args, kwargs)
        states, mask = kw.get("encoder_hidden_states"), kw.get("encoder_attention_mask")
        if states is None or mask is None or states.shape[1] <= mask.shape[1]:
            return None
        at = insertion_points(mask, mask.shape[0], self.located.cls_first, mask.device)
        extra = states.shape[1] - mask.shape[1]
        mixed = self._mixed(mask.shape[0], mask.device) if self._tokens_active() else None
        if mixed is not None and mixed.width == extra:  # the encoder's own layout, row by row
            kw["encoder_attention_mask"] = self._lengthen_mask(mask, at, mixed)
        else:
            kw["encoder_attention_mask"] = insert(mask, at, mask.new_ones(extra))
        return (), kw

    def stack_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Check that the embedding looked up the ids the stack was given, then
        strip the input stack's outputs before the head reads them, unless the
        head computes a per-token loss from lengthened labels (``model_post``
        strips after it then) or the stack's outputs are an encoder's (a
        decoder reads them). ``model_post`` finds nothing left. Closes the
        stack's frame if it opened one."""
        frame = self.frames.current()
        if frame is None:
            return None
        try:
            call = frame.state
            if output is None:  # the forward raised; the frame just closes
                return None
            if call.ids_hold_virtual:  # set by ``stack_pre``, taken by ``embed_pre``
                call.ids_hold_virtual = None
                raise not_applied(
                    self.located,
                    self.located.embedding,
                    "the prompt's virtual ids never reached the token embedding",
                    f"{type(module).__name__} to look its input_ids up in "
                    f"{type(self.located.embedding).__name__}",
                )
            loc = self.located
            if not self.strip_outputs or loc.is_encoder_decoder:
                return None
            if frame.opener == "model" and call.labels_lengthened:
                return None
            return self._strip(call, output)
        finally:
            if frame.opener == "stack":
                self.frames.remove(frame)

    def model_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        frame = self.frames.close("model")
        if frame is None or output is None or not self.strip_outputs:
            return None
        return self._strip(frame.state, output)

    def _strip(self, call: TokenCall, output: Any) -> Any:
        """Take the call's virtual positions out of per-position outputs (once)."""
        ins, call.insertion = call.insertion, None
        if ins is None:
            return None
        if isinstance(output, dict):  # transformers' ModelOutput
            for key in list(output.keys()):
                value = output[key]
                stripped = self._strip_field(key, value, ins)
                if stripped is not None and stripped is not value:
                    output[key] = stripped
            return output
        if self.located.is_encoder_decoder:
            # Without field names the decoder's outputs cannot be told from the
            # encoder's; the decoder's are the user's length already.
            return None
        if isinstance(output, tuple):
            return tuple(_strip_any(v, ins) for v in output)
        return _strip_any(output, ins)

    def _strip_field(self, key: str, value: Any, ins: Insertion) -> Any:
        encoder_side = self.located.is_encoder_decoder
        if encoder_side and not key.startswith("encoder_") and key != "cross_attentions":
            return None
        if key.endswith("attentions") and isinstance(value, tuple):
            if key == "cross_attentions":  # (B, H, L_dec, L_enc): keys only
                return tuple(_strip_dim(a, ins, 3) for a in value)
            return tuple(_strip_dim(_strip_dim(a, ins, 2), ins, 3) for a in value)
        return _strip_any(value, ins)


def _strip_dim(x: Any, ins: Insertion, dim: int) -> Any:
    if not (isinstance(x, torch.Tensor) and x.ndim > dim and x.shape[dim] == ins.length):
        return x
    if ins.mixed is not None:
        m = ins.mixed
        return strip_per_row(x, ins.at, m.counts, m.width, m.pad_front, dim)
    if ins.at_front:  # a view: no copy of vocabulary-sized logits (see benchmarks/overhead.py)
        return x.narrow(dim, ins.count, ins.length - ins.count)
    return strip(x, ins.at, ins.count, dim)


def _strip_any(value: Any, ins: Insertion) -> Any:
    """Strip per-position tensors ``(B, L+P, ...)``; recurse into tuples of them."""
    if isinstance(value, tuple):
        return tuple(_strip_any(v, ins) for v in value)
    if isinstance(value, torch.Tensor) and value.ndim >= 3:
        return _strip_dim(value, ins, 1)
    return value
