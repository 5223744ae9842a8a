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
from .caches import remember
from .calls import Frames
from .checks import not_applied
from .insertion import (
    Plan,
    Rows,
    continue_decoding,
    lengthen,
    lengthen_labels,
    lengthen_mask,
    plan_call,
    plan_rows,
    uniform_rows,
)
from .layout import insertion_points, positions_from_mask
from .masks import padding_mask
from .strip import strip_outputs


@dataclass
class TokenCall:
    """What one call's token hooks hand each other (see ``calls``)."""

    plan: Plan | None = None
    # ``model_pre`` lengthened per-token labels: the head's loss needs the
    # long outputs, so they are stripped after the head, not before it.
    labels_lengthened: bool = False
    stripped: bool = False
    # Set by ``stack_pre``, which knows whether the ids hold virtual tokens,
    # so ``embed_pre`` need not look (a host sync). None: not known.
    ids_hold_virtual: bool | None = None
    embed_ids: torch.Tensor | None = None  # from ``embed_pre`` to ``embed_post``


class SoftPromptHooks:
    """The hook functions for one attachment. They keep no state between calls:
    each call's lives in its frame (``calls``); what a cache holds, on the cache."""

    def __init__(self, located: Located, bank: PromptBank, strip_outputs: bool) -> None:
        self.located = located
        self.bank = bank
        self.strip_outputs = strip_outputs
        self.vocab_size = located.vocab_size
        self.stack_takes_positions = located.call_names(located.input_stack).positions is not None
        # Pad slots go where the model's own padding goes: in front for decoder-only
        # models (generation appends at the end), at the end for encoders and where
        # the locator says so (``Located.pad_slots_last``).
        self.pad_front = not (
            located.is_encoder_decoder or located.cls_first or located.pad_slots_last
        )
        # A causal loss whose rows start with the prompt: their first real token is
        # no target (``lengthen_labels``). Not where ``[CLS]`` stays first.
        self.shifted_labels = located.shifted_labels and not located.cls_first
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

    # -- planning a call -------------------------------------------------------------

    def _tokens_active(self) -> bool:
        """Some selected prompt enters through the embedding (not a prefix)."""
        return self.bank.selects("tokens")

    def _check_length(self, length: int) -> None:
        limit = self.located.max_positions
        if limit is not None and length > limit:
            raise ValueError(
                f"input too long: with the prompt the sequence has {length} positions, but "
                f"{type(self.located.model).__name__} embeds at most {limit}. Shorten the input "
                "(truncate to max_positions - num_virtual_tokens) or use fewer virtual tokens."
            )

    def _check_vocabulary(self) -> None:
        """Virtual ids start at the vocabulary size the prompts were attached with;
        an embedding resized since would read them as real tokens."""
        size = self.located.embedding.weight.shape[0]
        if size != self.vocab_size:
            raise RuntimeError(
                f"the token embedding was resized while prompts were attached (from "
                f"{self.vocab_size} to {size} tokens), so virtual ids from "
                f"{self.vocab_size} on would be read as real tokens: detach, resize, then "
                "attach again (att.detach(); model.resize_token_embeddings(...); ph.attach(...))"
            )

    def _vectors(self, rows: Rows) -> torch.Tensor:
        """The rows' prompt vectors ``(B, width, H)``, for calls that pass
        ``inputs_embeds``; picked in at least fp32, where gradients add up."""
        ids, table = self.bank.lookup(rows.ids, list(rows.names))
        table = table.to(torch.promote_types(table.dtype, torch.float32))
        return table[(ids - self.vocab_size).clamp(min=0)]

    # -- hooks ---------------------------------------------------------------------

    def model_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Any:
        # A frame at the model's level is needed only when ``model_post`` must strip
        # the outputs: an encoder's (in the model's output) or a head's that read
        # lengthened labels. Otherwise (a decode step, say) the stack opens its own
        # frame and strips before the head.
        if self.located.is_encoder_decoder:
            self.frames.open("model", TokenCall())
            return None  # labels belong to the decoder
        if kwargs.get("labels") is None and len(args) <= 1:
            return None  # no labels (every decode step): nothing to align
        if not self._tokens_active():
            return None  # no tokens are inserted
        kw = bind_kwargs(module, args, kwargs)
        labels = kw.get("labels")
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if labels is None or x is None or labels.ndim != 2 or labels.shape != x.shape[:2]:
            return None  # no labels, or per-sequence labels: nothing to align
        cache = read_cache(kw, self.located.call_names(module).cache)
        if cache_length(cache) > 0:
            return None  # a decode step
        self._check_vocabulary()
        plan = plan_call(self.bank, self.located, self.pad_front, kw, x, cache)
        if plan.insertion is None:
            return None
        kw["labels"] = lengthen_labels(labels, plan.insertion, self.shifted_labels)
        self.frames.open("model", TokenCall(plan=plan, labels_lengthened=True))
        return (), kw

    def stack_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Any:
        loc = self.located
        active = self._tokens_active()
        kw = bind_kwargs(module, args, kwargs)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        x = ids if ids is not None else embeds
        cache = read_cache(kw, loc.call_names(module).cache)
        past = cache_length(cache)
        if active and x is not None and past > 0:
            # A decode step: the cache holds the prompt already. No frame: there is
            # nothing to strip, and the embedding looks at its ids itself.
            self._check_length(past + x.shape[1])
            changed = continue_decoding(
                kw,
                cache,
                past,
                x.shape[1],
                loc.cls_first,
                self.stack_takes_positions,
                loc.first_position,
            )
            return ((), kw) if changed else None
        # Inside the model's call the stack fills the model's frame; called on
        # its own (``generate`` runs the T5 encoder so) it opens its own.
        frame = self.frames.current()
        if frame is None or frame.opener != "model":
            frame = self.frames.open("stack", TokenCall())
        call = frame.state
        call.ids_hold_virtual = None
        if not active:
            call.ids_hold_virtual = False  # ids the embedding cannot look up fail there
            return None
        if x is None:
            return None
        self._check_vocabulary()
        call.plan = plan = call.plan or plan_call(
            self.bank, self.located, self.pad_front, kw, x, cache
        )  # ``model_pre`` may have planned
        call.ids_hold_virtual = ids is not None  # inserted now, or placed by the user
        ins = plan.insertion
        if ins is None:  # every row holds its virtual ids already
            self._check_length(x.shape[1])
            if cache is not None:
                remember(cache, "inserted", None)
            if kw.get("position_ids") is None and self.stack_takes_positions:
                mask = padding_mask(kw.get("attention_mask"), x.shape[1], cache)
                if mask is not None:  # padding changes nothing
                    kw["position_ids"] = positions_from_mask(mask, loc.first_position)
                    return (), kw
            return None  # the model's own masks fit: nothing was inserted
        self._check_length(ins.length)
        embedded = self._vectors(ins.rows) if ids is None else None
        lengthen(
            kw,
            ins,
            embedded,
            cache,
            self.stack_takes_positions,
            loc.first_position,
            self.shifted_labels,
        )
        return (), kw

    def embed_pre(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        ids = args[0]
        frame = self.frames.current()
        holds = None
        if frame is not None:  # ``stack_pre`` says whether the ids hold virtual ones
            holds, frame.state.ids_hold_virtual = frame.state.ids_hold_virtual, None
            frame.state.embed_ids = None
        if holds is None:  # not said (a decode step, or the embedding called on its own)
            # A compiled graph cannot look; ids it cannot look up fail in the embedding.
            holds = not torch.compiler.is_compiling() and bool((ids >= self.vocab_size).any())
        if not holds:
            return None
        if frame is None:  # a frame of its own, to hand the ids to ``embed_post``
            frame = self.frames.open("embedding", TokenCall())
        frame.state.embed_ids = ids
        return (ids.masked_fill(ids >= self.vocab_size, 0), *args[1:])

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
        names = call.plan.names if call.plan is not None else None
        if names is None and not torch.compiler.is_compiling():  # ids the stack did not place
            names = tuple(self.bank.names_of_ids(ids))
        ids, table = self.bank.lookup(ids, None if names is None else list(names))
        return splice_tokens(output, ids, table, self.vocab_size)

    def encoder_mask_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Any:
        """A decoder reading the prompted encoder's output: its
        ``encoder_attention_mask`` gets the encoder's virtual tokens."""
        kw = bind_kwargs(module, args, kwargs)
        states, mask = kw.get("encoder_hidden_states"), kw.get("encoder_attention_mask")
        if states is None or mask is None or states.shape[1] <= mask.shape[1]:
            return None
        batch, extra = mask.shape[0], states.shape[1] - mask.shape[1]
        rows = None
        if self._tokens_active():  # the encoder's layout, row by row
            rows = plan_rows(self.bank, batch, mask.device, self.pad_front)
        if rows is None or rows.width != extra:
            rows = uniform_rows(extra, batch, mask.device)
        at = insertion_points(mask, batch, self.located.cls_first, mask.device)
        kw["encoder_attention_mask"] = lengthen_mask(mask, at, rows)
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
        ins = call.plan.insertion if call.plan is not None else None
        if ins is None or call.stripped:
            return None
        call.stripped = True
        return strip_outputs(output, ins, self.located.is_encoder_decoder)
