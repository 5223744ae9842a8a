"""Hooks that put a prefix's keys and values in front of every attention site.

A stack pre-hook decides, once per forward call of a stack, how the prefix
reaches its attention sites:

* **cache mode**: the call brings an empty cache (``generate``, or a user's own
  decoding loop). The prefix is written into the cache before the stack runs,
  so the model itself sees a past of length P: its masks, cache positions,
  static caches and T5's relative positions all come out right, and the
  self-attention hooks return at once, now and on every later decode step.
  Decoding costs what it costs the base model with P more cached tokens.
  The 2-D attention mask gets P leading ones (the prefix sits at the front of
  the cache, before any padding). Masks ``generate`` prepared for a static
  cache (4-D, or one per layer type) are read back to that 2-D mask first, so
  the model builds every layer type's mask from the cache, sliding windows
  included.
* **proxy mode**: no cache (training, ``use_cache=False``, the T5 encoder,
  gradient checkpointing, which drops caches). Each attention pre-hook gives
  its module a stand-in cache whose ``update`` returns ``[prefix ; keys]``, and
  pads the 4-D mask the model built with P attend columns (or builds the mask
  when transformers left it out for sdpa's ``is_causal`` shortcut, which would
  align the causal triangle to the wrong corner). If the model creates a real
  cache inside its forward, the hook writes the prefix into it instead, so the
  returned cache can be continued in cache mode.
* **continuation**: the cache already holds the prefix (decode steps): only
  the 2-D mask and positions are adjusted.

Positions: with ``shift_positions`` real tokens start at position P, as if the
prefix were P earlier tokens (PEFT's convention); otherwise at 0. Stacks that
take position ids get them; stacks that number positions themselves (BART:
from the sequence length and the cache length, where a prefix in the cache
counts and a prefix given by proxy does not) have their position tables
(``Located.position_tables``) renumbered by a forward hook.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..locators.base import Located, Role
from ..locators.conventions import read_cache
from ..methods.prefix_tuning import Prefix
from .arguments import Kwargs, bind_kwargs, cache_length
from .bank import PromptBank
from .caches import recall
from .calls import Frames
from .checks import check_prefix_applied, check_sites_take_their_names
from .masks import padding_mask, prepend_attend
from .prefix_caches import cached_dtype, write_prefix
from .prefix_rows import KeyValues, PrefixRows, build_rows, prefix_positions
from .prefix_sites import PrefixSites
from .projections import ProjectionSites

#: Roles whose sites run inside the input stack; the others run in the decoder.
INPUT_SIDE: frozenset[Role] = frozenset({"self", "enc_self"})
DECODER_SIDE: frozenset[Role] = frozenset({"dec_self", "cross"})


@dataclass
class PrefixCall:
    """What one stack call's prefix hooks hand each other (see ``calls``)."""

    rows: PrefixRows | None = None  # the call's prefix layout, if any
    kv: KeyValues = field(default_factory=list)
    proxy: set[Role] = field(default_factory=set)  # roles whose hooks splice in this call
    cross_count: int = 0  # prefix length on cross-attention keys (decoder calls)
    reentrant: set[int] = field(default_factory=set)  # sites inside reentrant checkpoints
    # The last mask each role was given and its padded form: layers share one mask.
    padded: dict[Role, tuple[Any, torch.Tensor | None]] = field(default_factory=dict)
    windowed: dict[tuple[Role, int], tuple[Any, torch.Tensor | None]] = field(default_factory=dict)
    # What this call handed each site (a cache stand-in, or the real cache
    # holding the prefix), and per side a filled cache with its length before
    # the stack ran: checked after the stack (see ``_check_applied``).
    handed: dict[int, Any] = field(default_factory=dict)
    filled: dict[frozenset[Role], tuple[Any, int]] = field(default_factory=dict)
    # Sites whose fixed-size cache layer got the prefix before the model's own
    # keys this call: on their first update it takes the model's dtypes.
    adopting: set[int] = field(default_factory=set)
    # Per stack side, the position of the call's first new token, for the
    # stacks that number positions themselves (int, or (B, 1) per row).
    starts: dict[frozenset[Role], torch.Tensor | int] = field(default_factory=dict)
    # Per projection site (DistilBERT), while the module runs: its prefix keys
    # and values, the slots in front, and how many projections ran.
    armed: dict[int, dict[str, Any]] = field(default_factory=dict)


class PrefixHooks:
    """The hook functions of one attachment's prefixes. They keep no state
    between calls: each stack call's lives in its frame (``calls``); what a
    cache holds, on the cache."""

    def __init__(self, located: Located, bank: PromptBank) -> None:
        check_sites_take_their_names(located)
        self.located = located
        self.bank = bank
        self.sites = located.sites
        self.frames: Frames[PrefixCall] = Frames()
        self.handles: list[RemovableHandle] = []
        self.attention = PrefixSites(self)
        self.projection_sites = ProjectionSites(self)
        self._has_sites = {
            roles: any(s.role in roles for s in self.sites) for roles in (INPUT_SIDE, DECODER_SIDE)
        }

    def install(self) -> None:
        loc = self.located
        # One handle at a time: a registration that fails leaves the earlier
        # ones in ``_handles``, so ``remove`` undoes a partial install. Hooks are
        # bound methods (or partials of them), so a copy of the model gets hooks
        # bound to its own copy of this object. Post-hooks that close a frame run
        # also when the forward raises.
        handles = self.handles
        stack = loc.input_stack
        handles.append(stack.register_forward_pre_hook(self.input_pre, with_kwargs=True))
        handles.append(stack.register_forward_hook(self.input_post, always_call=True))
        for decoder in loc.encoder_mask_readers:
            handles.append(decoder.register_forward_pre_hook(self.decoder_pre, with_kwargs=True))
            handles.append(decoder.register_forward_hook(self.decoder_post, always_call=True))
        # Every attention site gets its hook now, not when first needed: installing
        # hooks inside a forward call would break a ``torch.compile`` graph. A hook
        # with nothing to do (cache mode, decode steps) returns at once.
        for index, site in enumerate(self.sites):
            if site.prefix_in == "projections":
                self.projection_sites.install(index, site)
                continue
            hook = functools.partial(self.attention.attention_pre, index)
            handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
        for table in loc.position_tables:
            roles = INPUT_SIDE if table.role in INPUT_SIDE else DECODER_SIDE
            renumber = functools.partial(self.attention.renumber, roles, table)
            handles.append(table.module.register_forward_hook(renumber))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def build(self, batch: int) -> tuple[PrefixRows, KeyValues]:
        return build_rows(self.bank, len(self.sites), batch)

    def running(self, role: Role) -> PrefixCall | None:
        """The running stack call's state; during a checkpoint's recomputation
        in the backward pass, that of the checkpointed call of ``role``'s stack."""
        opener = "input" if role in INPUT_SIDE else "decoder"
        frame = self.frames.current() or self.frames.for_recompute(opener)
        return frame.state if frame is not None else None

    def _expected_width(self) -> int | None:
        """Prefix width of the current selection, or None when it is not a prefix."""
        selection = self.bank.selection()
        if isinstance(selection, str):  # one prompt (every decode step reads this)
            prompt = self.bank.prompts[selection]
            return prompt.num_virtual_tokens if isinstance(prompt, Prefix) else None
        prompts = [self.bank.prompts[n] for n in selection]
        widths = [p.num_virtual_tokens for p in prompts if isinstance(p, Prefix)]
        return max(widths) if widths else None

    # -- stacks ----------------------------------------------------------------

    def input_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Any:
        return self._open_stack(module, args, kwargs, "input", INPUT_SIDE)

    def decoder_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Any:
        return self._open_stack(module, args, kwargs, "decoder", DECODER_SIDE)

    def _open_stack(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: Kwargs,
        opener: str,
        roles: frozenset[Role],
    ) -> Any:
        frame = self.frames.open(opener, PrefixCall())
        call = frame.state
        result = self._stack_pre(call, module, args, kwargs, roles)
        if call.rows is not None and (call.proxy or call.cross_count or call.adopting):
            self.frames.busy.add(frame)  # the attention hooks have work this call
        return result

    def input_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._stack_post(module, output, "input", INPUT_SIDE)

    def decoder_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._stack_post(module, output, "decoder", DECODER_SIDE)

    def _stack_post(
        self, stack: nn.Module, output: Any, opener: str, roles: frozenset[Role]
    ) -> None:
        frame = self.frames.close(opener)
        if frame is None:
            return
        self.frames.busy.discard(frame)
        if output is None:  # the forward raised
            return
        call = frame.state
        if not (call.proxy or call.filled):  # a decode step, or no prefix: nothing to check
            return
        if call.proxy and stack.training and torch.is_grad_enabled():
            self.frames.keep_for_recompute(frame)  # gradient checkpointing runs layers again
        check_prefix_applied(self.located, call, stack, roles)

    def _stack_pre(
        self,
        call: PrefixCall,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: Kwargs,
        roles: frozenset[Role],
    ) -> Any:
        if not self._has_sites[roles]:
            return None
        width = self._expected_width()
        if width is None:
            return None
        kw = bind_kwargs(module, args, kwargs)
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if x is None:
            return None
        names = self.located.call_names(module)
        cache = read_cache(kw, names.cache)
        past = cache_length(cache)
        new = x.shape[1]
        mask = kw.get("attention_mask")
        if cache is not None or isinstance(mask, dict):  # masks generate prepared: 2-D again
            mask = padding_mask(mask, past - width + new if past else new, cache)
            kw["attention_mask"] = mask
        elif mask is not None and mask.ndim not in (2, 4):
            raise ValueError(
                f"prompthooks needs a 2-D (batch, length) attention_mask, got shape "
                f"{tuple(mask.shape)}; pass the padding mask and let the model build the rest"
            )
        if past > 0:  # a decode step: the cache must already hold this prefix
            rows = recall(cache, "prefix")
            if rows is None or rows.width != width:
                raise ValueError(
                    "this cache was not filled with the attached prefix "
                    f"({width} virtual tokens); start decoding from a call without "
                    "past_key_values while the prefix is attached"
                )
            # (No check after the stack: the call that filled this cache checked
            # that the model stores its keys in it.)
            call.rows = rows
            if mask is None and rows.keep is not None:  # rows must not see their unused slots
                mask = torch.ones(x.shape[0], past + new - width, dtype=torch.long, device=x.device)
            if mask is not None and mask.shape[1] == past + new - width:
                kw["attention_mask"] = mask = prepend_attend(mask, rows)
            user_past = past - width
        else:
            rows, call.kv = self.build(x.shape[0])
            call.rows = rows
            user_past = 0
            checkpointing = module.training and bool(getattr(module, "gradient_checkpointing", 0))
            if cache is not None and not checkpointing:
                self._fill(call, cache, roles, x.shape[0])
                call.filled[roles] = (cache, cache_length(cache))
                if mask is None and rows.keep is not None:
                    mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
                if mask is not None:
                    kw["attention_mask"] = mask = prepend_attend(mask, rows)
                if kw.get("cache_position") is not None:
                    kw["cache_position"] = kw["cache_position"] + width
            else:
                call.proxy |= roles
        if "cross" in roles:
            call.cross_count = width
        self._check_length(module, user_past + new + rows.largest_offset)
        call.starts[roles] = user_past + rows.offsets
        if names.positions is not None:
            kw["position_ids"] = prefix_positions(
                rows, kw.get("position_ids"), mask, user_past, new, self.located
            )
        return (), kw

    def _check_length(self, module: nn.Module, length: int) -> None:
        limit = self.located.max_positions
        if module is self.located.input_stack and limit is not None and length > limit:
            raise ValueError(
                f"input too long: with the prefix's position shift the sequence reaches "
                f"position {length}, but {type(self.located.model).__name__} embeds at most "
                f"{limit}. Shorten the input, use fewer virtual tokens, or "
                "PrefixTuning(shift_positions=False)."
            )

    def _fill(self, call: PrefixCall, cache: Any, roles: frozenset[Role], batch: int) -> None:
        """Write the prefix of every site of ``roles`` into an empty cache."""
        weight = self.located.embedding.weight
        dtype = cached_dtype(weight.dtype, weight.device)
        assert call.rows is not None
        for index, site in enumerate(self.sites):
            if site.role in roles:
                keys, values = call.kv[index]
                if write_prefix(cache, site, call.rows, keys, values, batch, dtype):
                    call.adopting.add(index)
