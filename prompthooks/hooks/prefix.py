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
  the cache, before any padding).
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

from ..kernels import prefix_concat
from ..kernels.concat import accumulation_dtype, per_row
from ..locators.base import AttentionSite, Located, PositionTable, Role
from ..locators.conventions import read_cache
from ..methods.prefix_tuning import Prefix
from .arguments import Kwargs, bind_kwargs, cache_length
from .bank import PromptBank
from .caches import capacity, layer_cache, make_room, recall, remember
from .calls import Frames
from .checks import check_sites_take_their_names, not_applied
from .layout import positions_from_mask
from .masks import pad_mask, prepend_attend

#: Roles whose sites run inside the input stack; the others run in the decoder.
INPUT_SIDE: frozenset[Role] = frozenset({"self", "enc_self"})
DECODER_SIDE: frozenset[Role] = frozenset({"dec_self", "cross"})

#: Per site, keys and values: ``(H, P, D)`` shared by all rows or ``(B, H, W, D)``.
KeyValues = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixedKV:
    """Stands in for a missing cache: every update returns ``[prefix ; new]``.

    It stores nothing, so a training step holds no extra state, and
    ``get_seq_length`` reports the prefix as a past (T5 reads it to place its
    relative positions).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # (H, P, D) shared by every row, or (B, H, W, D) per row
        self.keys, self.values = keys, values
        self.used = False  # the module asked for its keys (checked after the stack)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.used = True
        return prefix_concat(self.keys, key_states), prefix_concat(self.values, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys.shape[-2])


class StoredPrefixedKV(PrefixedKV):
    """Stands in for a sliding-window cache the model made inside its forward,
    whose layer already holds the prefix: updates are stored in it, and
    ``[prefix ; new]`` is returned whole. The layer itself returns only its
    last ``window - 1`` stored keys in front of the new ones, fewer columns
    than the padded mask has once the prefix is that long; the keys it drops
    are the ones the window hides anyway.
    """

    def __init__(self, cache: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(keys, values)
        self.cache = cache

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.update(key_states, value_states, *args, **kwargs)
        return super().update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.cache.get_seq_length(layer_idx))


@dataclass(frozen=True)
class PrefixRows:
    """How one call's prefix sits in front of each row's keys.

    One prefix for the whole batch: ``keep`` is ``None`` and the counts are
    ints. A mixed batch (``att.use([...])`` with prefixes of different
    lengths): every row gets ``width`` key slots, its own prefix right-aligned
    in them and the slots in front of it masked (``keep`` False), so each row
    computes what it computes alone (T5's relative positions included).
    """

    width: int
    keep: torch.Tensor | None  # (B, width) bool
    counts: torch.Tensor | int  # (B, 1): each row's prefix length
    offsets: torch.Tensor | int  # (B, 1): position shift of each row's real tokens
    largest_offset: int  # the largest of ``offsets``, known without reading a tensor


def build_rows(bank: PromptBank, sites: int, batch: int) -> tuple[PrefixRows, KeyValues]:
    """One call's prefix layout and per-site keys/values (each prefix runs once)."""
    rows = bank.per_row(batch)
    if rows is None:
        prefix = bank.prompts[bank.active()]
        assert isinstance(prefix, Prefix)
        count = prefix.num_virtual_tokens
        offset = count if prefix.shift_positions else 0
        return PrefixRows(count, None, count, offset, offset), prefix.key_values()
    # Rows whose prompt is a soft prompt (served by the token hooks) get no prefix:
    # all their slots are masked.
    named = {n: bank.prompts[n] for n in dict.fromkeys(rows)}
    prefixes = [p for p in named.values() if isinstance(p, Prefix)]
    distinct = [n for n, p in named.items() if isinstance(p, Prefix)]
    per_prefix = [p.key_values() for p in prefixes]
    width = max(p.num_virtual_tokens for p in prefixes)
    device = per_prefix[0][0][0].device
    none = len(distinct)  # index of the all-masked "no prefix" entry
    pick = torch.tensor([distinct.index(r) if r in distinct else none for r in rows], device=device)
    kv: KeyValues = []
    for site in range(sites):
        parts = []
        for part in (0, 1):
            # Picked in at least fp32, so rows that share a prefix add up its gradient there.
            blocks = [_right_aligned(_wide(kvs[site][part]), width) for kvs in per_prefix]
            blocks.append(torch.zeros_like(blocks[0]))
            parts.append(torch.stack(blocks)[pick])  # (B, H, W, D)
        kv.append((parts[0], parts[1]))
    lengths = torch.tensor([p.num_virtual_tokens for p in prefixes] + [0], device=device)
    lengths = lengths[pick]
    shifts = torch.tensor([p.shift_positions for p in prefixes] + [False], device=device)
    shifts = shifts[pick]
    keep = torch.arange(width, device=device).unsqueeze(0) >= (width - lengths).unsqueeze(1)
    counts = lengths.unsqueeze(1)
    largest = max(p.num_virtual_tokens if p.shift_positions else 0 for p in prefixes)
    offsets = counts * shifts.unsqueeze(1)
    return PrefixRows(width, keep, counts, offsets, largest), kv


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
        self._handles: list[RemovableHandle] = []
        self._has_sites = {
            roles: any(s.role in roles for s in self.sites) for roles in (INPUT_SIDE, DECODER_SIDE)
        }
        self._causal_roles = {
            roles: any(s.causal for s in self.sites if s.role in roles and s.role != "cross")
            for roles in (INPUT_SIDE, DECODER_SIDE)
        }

    def install(self) -> None:
        loc = self.located
        # One handle at a time: a registration that fails leaves the earlier
        # ones in ``_handles``, so ``remove`` undoes a partial install. Hooks are
        # bound methods (or partials of them), so a copy of the model gets hooks
        # bound to its own copy of this object. Post-hooks that close a frame run
        # also when the forward raises.
        handles = self._handles
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
                self._projection_hooks(index, site)
                continue
            hook = functools.partial(self.attention_pre, index)
            handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
        for table in loc.position_tables:
            roles = INPUT_SIDE if table.role in INPUT_SIDE else DECODER_SIDE
            renumber = functools.partial(self.renumber, roles, table)
            handles.append(table.module.register_forward_hook(renumber))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _build(self, batch: int) -> tuple[PrefixRows, KeyValues]:
        return build_rows(self.bank, len(self.sites), batch)

    def _running(self, role: Role) -> PrefixCall | None:
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
        if call.proxy and stack.training and torch.is_grad_enabled():
            self.frames.keep_for_recompute(frame)  # gradient checkpointing runs layers again
        self._check_applied(call, stack, roles)

    def _check_applied(self, call: PrefixCall, stack: nn.Module, roles: frozenset[Role]) -> None:
        """After a stack ran: every site of ``roles`` used the prefix it was handed
        (proxy mode), or the filled cache grew by the stack's tokens (cache mode)."""
        filled = call.filled.pop(roles, None)
        if filled is not None:
            cache, before = filled
            if cache_length(cache) <= before:
                raise not_applied(
                    self.located,
                    stack,
                    "the key/value cache that holds the prefix was not updated",
                    f"{type(stack).__name__} to pass that cache to its attention modules",
                )
        if not (roles & call.proxy):
            return
        # LayerDrop (BART, OPT, ...) skips whole layers while training: their sites
        # are never called, and there is no attention for a prefix to be missing from.
        layerdrop = getattr(stack, "layerdrop", 0.0)
        skips_layers = stack.training and isinstance(layerdrop, float) and layerdrop > 0
        for index, site in enumerate(self.sites):
            if site.role not in roles or site.prefix_in != "cache":
                continue
            handed = call.handed.pop(index, None)
            if handed is None and skips_layers:
                continue
            if handed is None:
                raise not_applied(
                    self.located,
                    site.module,
                    "the prefix never reached this attention site (its pre-hook did not run)",
                    f"{type(stack).__name__} to call every attention module it located",
                )
            if not handed.used:
                raise not_applied(
                    self.located,
                    site.module,
                    f"the prefix handed over as {site.cache_arg!r} was never asked for its keys",
                    f"{type(site.module).__name__}.forward to take its key/value cache as "
                    f"{site.cache_arg!r} and call its update()",
                )

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
        if mask is not None and mask.ndim not in (2, 4):
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
            call.rows = rows
            call.filled[roles] = (cache, past)
            if mask is None and rows.keep is not None:  # rows must not see their unused slots
                mask = torch.ones(x.shape[0], past + new - width, dtype=torch.long, device=x.device)
            if mask is not None and (mask.ndim == 4 or mask.shape[1] == past + new - width):
                kw["attention_mask"] = mask = prepend_attend(
                    mask, rows, capacity(cache), past if self._causal(roles) else None
                )
            user_past = past - width
        else:
            rows, call.kv = self._build(x.shape[0])
            call.rows = rows
            user_past = 0
            checkpointing = module.training and bool(getattr(module, "gradient_checkpointing", 0))
            if cache is not None and not checkpointing:
                self._fill(call, cache, roles, x.shape[0])
                call.filled[roles] = (cache, cache_length(cache))
                if mask is None and rows.keep is not None:
                    mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
                if mask is not None:
                    kw["attention_mask"] = mask = prepend_attend(
                        mask, rows, capacity(cache), width if self._causal(roles) else None
                    )
                if kw.get("cache_position") is not None:
                    kw["cache_position"] = kw["cache_position"] + width
            else:
                call.proxy |= roles
        if "cross" in roles:
            call.cross_count = width
        self._check_length(module, user_past + new + rows.largest_offset)
        call.starts[roles] = user_past + rows.offsets
        if names.positions is not None:
            kw["position_ids"] = self._positions(call, kw, mask, user_past, new)
        return (), kw

    def _positions(
        self, call: PrefixCall, kw: Kwargs, mask: torch.Tensor | None, user_past: int, new: int
    ) -> torch.Tensor:
        """Explicit positions of the new real tokens (see the module docstring)."""
        assert call.rows is not None
        offsets, counts = call.rows.offsets, call.rows.counts
        given: torch.Tensor | None = kw.get("position_ids")
        if given is not None:
            return given + offsets
        first = self.located.first_position
        if mask is not None and mask.ndim == 2:
            if mask.shape[1] == user_past + new:  # the user's own mask (proxy mode)
                return positions_from_mask(mask, first)[:, -new:] + offsets
            # the mask now starts with the prefix's ones, which count as positions.
            # Left pads after them would land below ``first`` without the shift
            # (-1 breaks GPT-2's and GPT-J's position lookups); pads are masked,
            # so any valid position does.
            positions = positions_from_mask(mask, first)[:, -new:] - (counts - offsets)
            return positions.clamp(min=first)
        device = self.located.embedding.weight.device
        return torch.arange(new, device=device).unsqueeze(0) + (first + user_past) + offsets

    def _causal(self, roles: frozenset[Role]) -> bool:
        return self._causal_roles[roles]

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
        for index, site in enumerate(self.sites):
            if site.role in roles:
                keys, values = call.kv[index]
                self._write(call, cache, site, keys, values, batch, dtype)

    def renumber(
        self,
        roles: frozenset[Role],
        table: PositionTable,
        module: nn.Module,
        args: tuple[Any, ...],
        output: torch.Tensor,
    ) -> Any:
        """A position table's forward hook: its output gets the positions of this
        call's new tokens, ``start, start + 1, ...`` (see ``_stack_pre``)."""
        call = self._running(table.role)
        start = call.starts.get(roles) if call is not None else None
        if start is None:
            return None
        length = output.shape[-2]
        return table.lookup(torch.arange(length, device=output.device).unsqueeze(0) + start)

    # -- attention ---------------------------------------------------------------

    def attention_pre(
        self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs
    ) -> Any:
        """An attention site's pre-hook: in proxy mode its cache argument becomes
        ``[prefix ; keys]`` and its mask gets the prefix's columns."""
        frames = self.frames
        if not frames.busy and not frames.kept:  # nothing to do here: every layer,
            return None  # every decode step (the cache holds the prefix already)
        site = self.sites[index]
        call = self._running(site.role)
        rows = call.rows if call is not None else None
        if call is None or rows is None:
            return None
        adopting = index in call.adopting  # the prefill call of a fixed-size cache
        if adopting:
            call.adopting.discard(index)
            assert site.cache_arg is not None  # checked at attach
            cache = _AdoptsDtypes(read_cache(kwargs, site.cache_arg), site.role)
            kwargs = {**kwargs, site.cache_arg: cache}
        proxy = site.role in call.proxy
        if not proxy and not (site.role == "cross" and call.cross_count):
            # Decode steps end here: the call's arguments stay as they came.
            return (args, kwargs) if adopting else None
        if len(args) > 1:
            kw, args = bind_kwargs(module, args, kwargs), ()
            hidden = kw["hidden_states"]
        else:
            kw = dict(kwargs)
            hidden = args[0] if args else kw["hidden_states"]
        batch = hidden.shape[0]
        if proxy:
            keys, values = call.kv[index]
            if keys.requires_grad and not torch.is_grad_enabled():
                call.reentrant.add(index)  # a reentrant checkpoint's no-grad forward
            elif index in call.reentrant:
                # Its recomputation inside backward backpropagates each layer on
                # its own: give the layer its own graph to the prefix parameters
                # instead of sharing (and freeing) the one built for the call.
                keys, values = self._build(batch)[1][index]
            name = site.cache_arg
            assert name is not None  # checked at attach
            cache = read_cache(kw, name)
            if cache is None:
                kw[name] = call.handed[index] = PrefixedKV(keys, values)
            else:  # a cache the model made inside its forward: keep the prefix in it
                dtype = cached_dtype(hidden.dtype, hidden.device)
                self._write(call, cache, site, keys, values, batch, dtype)
                kw[name] = cache
                if index in call.adopting:
                    call.adopting.discard(index)
                    kw[name] = _AdoptsDtypes(cache, site.role)
                call.handed[index] = _GrowsPast(layer_cache(cache, site.role), site.layer)
                if site.window is not None:
                    kw[name] = call.handed[index] = StoredPrefixedKV(cache, keys, values)
        mask_name = site.mask_arg
        assert mask_name is not None  # checked at attach
        mask = kw.get(mask_name)
        # Layers of one role share a mask; sliding-window layers share theirs.
        window = site.window
        if window is None:
            seen = call.padded.get(site.role)
        else:
            seen = call.windowed.get((site.role, window))
        if seen is not None and seen[0] is mask:
            kw[mask_name] = seen[1]
        else:
            causal = site.causal and site.role != "cross"
            padded = pad_mask(
                mask, rows, hidden.shape[1], causal, hidden.dtype, hidden.device, window
            )
            if window is None:
                call.padded[site.role] = (mask, padded)
            else:
                call.windowed[(site.role, window)] = (mask, padded)
            kw[mask_name] = padded
        return args, kw

    # -- attention that takes no cache: through the key/value projections -------

    def _projection_hooks(self, index: int, site: AttentionSite) -> None:
        """Hooks for a site with ``prefix_in="projections"`` (DistilBERT).

        The module's ``hidden_states`` get W leading zero rows; the forward
        hooks on its key and value projections replace those rows' outputs
        with the prefix, so the attention sees ``[prefix ; keys]``. The W query
        rows they add attend to every key (no row is fully masked, so no NaN
        reaches a gradient) and are dropped from the module's output.
        """
        key_proj, value_proj = site.key_proj, site.value_proj
        if key_proj is None or value_proj is None:
            raise TypeError(
                f"attention site at layer {site.layer} has prefix_in='projections' but no "
                "key_proj / value_proj module"
            )
        handles = self._handles
        pre = functools.partial(self.projection_site_pre, index)
        handles.append(site.module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(key_proj.register_forward_hook(functools.partial(self.projected, index, 0)))
        handles.append(
            value_proj.register_forward_hook(functools.partial(self.projected, index, 1))
        )
        # before transformers' own output recorders (``output_attentions``)
        post = functools.partial(self.projection_site_post, index)
        handles.append(site.module.register_forward_hook(post, prepend=True))

    def projection_site_pre(
        self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs
    ) -> Any:
        site = self.sites[index]
        call = self._running(self.sites[index].role)
        if call is None:
            return None
        call.armed.pop(index, None)
        rows = call.rows
        if rows is None:
            return None
        if site.role not in call.proxy:
            raise TypeError(
                f"{type(module).__name__} takes no key/value cache, so a prefix cannot "
                "be given as a past: call the model without past_key_values"
            )
        if len(args) > 1:
            kw, args = bind_kwargs(module, args, kwargs), ()
        else:
            kw = dict(kwargs)
        hidden = args[0] if args else kw["hidden_states"]
        width = rows.width
        zeros = hidden.new_zeros(hidden.shape[0], width, hidden.shape[-1])
        extended = torch.cat([zeros, hidden], dim=1)
        if args:
            args = (extended,)
        else:
            kw["hidden_states"] = extended
        kv = self._proxy_kv(call, index, hidden.shape[0])
        call.armed[index] = {"kv": kv, "width": width, "projected": 0}
        mask_name = site.mask_arg
        assert mask_name is not None  # checked at attach
        mask = kw.get(mask_name)
        seen = call.padded.get(site.role)
        if seen is not None and seen[0] is mask:  # every layer gets the same mask
            kw[mask_name] = seen[1]
            return args, kw
        padded = pad_mask(mask, rows, hidden.shape[1], site.causal, hidden.dtype, hidden.device)
        if padded is not None and padded.shape[-2] != 1:  # one mask row per query
            attend = True if padded.dtype == torch.bool else 0.0
            front = padded.new_full((*padded.shape[:-2], width, padded.shape[-1]), attend)
            padded = torch.cat([front, padded], dim=-2)
        call.padded[site.role] = (mask, padded)
        kw[mask_name] = padded
        return args, kw

    def projected(
        self, index: int, part: int, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
    ) -> Any:
        """A key (``part`` 0) or value (1) projection's output: the prefix in its leading rows."""
        call = self._running(self.sites[index].role)
        armed = call.armed.get(index) if call is not None else None
        if armed is None:
            return None
        site = self.sites[index]
        width = armed["width"]
        armed["projected"] += 1
        b, length = output.shape[0], output.shape[1] - width
        real = output[:, width:].view(b, length, site.num_kv_heads, site.head_dim)
        joined = prefix_concat(armed["kv"][part], real.transpose(1, 2))
        return joined.transpose(1, 2).reshape(b, width + length, -1)

    def projection_site_post(
        self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any
    ) -> Any:
        call = self._running(self.sites[index].role)
        armed = call.armed.pop(index, None) if call is not None else None
        if armed is None:
            return None
        width, projected = armed["width"], armed["projected"]
        if projected != 2:
            raise not_applied(
                self.located,
                module,
                f"the prefix reached {projected} of its key and value projections",
                f"{type(module).__name__} to run its key and value projections once each per call",
            )
        if isinstance(output, tuple):  # (attention output, weights or None)
            weights = output[1] if len(output) > 1 else None
            if isinstance(weights, torch.Tensor):  # (B, H, queries, keys): drop queries
                weights = weights[:, :, width:]
            return (output[0][:, width:], weights, *output[2:])
        return output[:, width:]

    def _proxy_kv(
        self, call: PrefixCall, index: int, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Site ``index``'s prefix keys and values for a proxy-mode module call
        (see the reentrant-checkpoint note in ``attention_pre``)."""
        keys, values = call.kv[index]
        if keys.requires_grad and not torch.is_grad_enabled():
            call.reentrant.add(index)
        elif index in call.reentrant:
            keys, values = self._build(batch)[1][index]
        return keys, values

    def _write(
        self,
        call: PrefixCall,
        cache: Any,
        site: AttentionSite,
        keys: torch.Tensor,
        values: torch.Tensor,
        batch: int,
        dtype: torch.dtype,
    ) -> None:
        target = layer_cache(cache, site.role)
        if target is None:
            raise TypeError(f"{type(cache).__name__} has no cross-attention cache")
        if cache_length(target, site.layer) != 0:
            raise RuntimeError(
                f"prefix: layer {site.layer}'s cache is not empty at the start of a sequence"
            )
        assert call.rows is not None
        # (Encoder-decoder caches are not wrapped: modules test their class. T5's and
        # BART's keys and values share one dtype anyway: no rotary embedding.)
        if make_room(target, site.layer, call.rows.width) and target is cache:
            call.adopting.add(self.sites.index(site))
        k = _batched(keys, batch, dtype).contiguous()
        v = _batched(values, batch, dtype).contiguous()
        target.update(k, v, site.layer)
        remember(cache, "prefix", call.rows)


class _AdoptsDtypes:
    """A cache whose fixed-size layer was allocated for the prefix, in the dtype
    prompthooks chose, before the model's first keys arrived. On that update the
    layer takes the dtypes of the model's keys and values (an exact widening of
    the prefix where they are wider), as it would without a prefix: under
    autocast a rotary model's keys are fp32 while its values are bf16, and a
    static layer cannot copy keys of another dtype into its slots."""

    def __init__(self, cache: Any, role: Role) -> None:
        self.cache, self.role = cache, role

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = layer_cache(self.cache, self.role).layers[layer_idx]
        if layer.keys.dtype != keys.dtype:
            layer.keys = layer.keys.to(keys.dtype)
        if layer.values.dtype != values.dtype:
            layer.values = layer.values.to(values.dtype)
        result: tuple[torch.Tensor, torch.Tensor] = self.cache.update(
            keys, values, layer_idx, *args, **kwargs
        )
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


class _GrowsPast:
    """A real cache layer handed to a site with the prefix already in it: used
    once the module has stored its own keys after the prefix."""

    def __init__(self, cache: Any, layer: int) -> None:
        self.cache, self.layer = cache, layer
        self.before = cache_length(cache, layer)

    @property
    def used(self) -> bool:
        return cache_length(self.cache, self.layer) > self.before


def _batched(x: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """``(H, P, D)`` shared by all rows, or already ``(B, H, W, D)``, as ``(B, H, *, D)``
    in ``dtype`` (a shared prefix is cast row by row: its gradient adds up in fp32)."""
    return x.to(dtype) if x.ndim == 4 else per_row(x, batch, dtype)


def cached_dtype(activations: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a model's cached keys and values have, given its activations' dtype.

    Under ``torch.autocast`` the activations stay fp32 but the key and value
    projections run in the autocast dtype, and so does the cache the model
    fills. A prefix written in fp32 would promote every later ``DynamicCache``
    update to fp32 (twice the memory of the base model's cache) and make a
    ``StaticCache`` fail (``index_copy_`` of bf16 keys into fp32 slots).
    """
    if activations == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return activations


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(accumulation_dtype(x.dtype))


def _right_aligned(x: torch.Tensor, width: int) -> torch.Tensor:
    """``(H, P, D)`` -> ``(H, width, D)`` with the prefix in the last P slots."""
    return nn.functional.pad(x, (0, 0, width - x.shape[1], 0))
