"""One call's plan for virtual tokens, and what it does to the call's tensors.

A call that starts a sequence builds one immutable :class:`Insertion`: which
virtual ids each row gets and where. Every tensor of the call that is indexed
by position (ids or embeddings, the padding mask, positions, token types,
per-token labels) is lengthened by the same plan, and every per-position
output is stripped by it (``strip.py``). The part of the plan that outlives
the call, :class:`Rows`, is noted on the call's cache, so decode steps can
lengthen their masks and positions to match.

One prompt for the whole batch is the plan whose rows all read that prompt:
there is no second code path for it, only a free view when stripping outputs
whose rows all start with their prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..locators.base import Located
from .arguments import Kwargs
from .bank import PromptBank
from .caches import make_room_everywhere, prefix_width, recall, remember
from .layout import insert, insertion_points, positions_from_mask, shift_positions
from .masks import padding_mask

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
class Rows:
    """What each row of a batch inserts: ``counts[b]`` virtual ids
    (``ids[b, :counts[b]]``) and ``width - counts[b]`` masked pad slots."""

    counts: torch.Tensor  # (B,)
    ids: torch.Tensor  # (B, width) virtual ids, 0 beyond a row's count
    width: int
    pad_front: bool  # pad slots in front of the row (decoder-only), else at its end
    names: tuple[str, ...]  # the token prompts the rows use, in id order
    uniform: bool  # every row inserts ``width`` ids: no pad slots

    @property
    def pad_slots(self) -> bool:
        return not self.uniform

    @property
    def pad_side(self) -> bool | None:
        """``pad_front`` for the layout functions; ``None``: no pad slots."""
        return None if self.uniform else self.pad_front


@dataclass(frozen=True)
class Insertion:
    """Where one call's virtual tokens go: ``rows`` at each row's ``at``."""

    rows: Rows
    at: torch.Tensor  # (B,) first virtual position of each row
    length: int  # the lengthened sequence's length
    at_front: bool  # every row starts with its prompt: stripping is a free view


@dataclass(frozen=True)
class Plan:
    """What one call that starts a sequence does with virtual tokens."""

    insertion: Insertion | None  # None: nothing to insert (every row is a template)
    names: tuple[str, ...] | None  # the token prompts the ids will use (None: not known)


def plan_call(
    bank: PromptBank, located: Located, pad_front: bool, kw: Kwargs, x: torch.Tensor, cache: Any
) -> Plan:
    """The plan of a call that starts a sequence (``x``: its ids or embeddings)."""
    ids = kw.get("input_ids")
    templates, names = template_rows(bank, ids) if ids is not None else (None, None)
    if templates is not None and all(templates):
        return Plan(None, names)  # the user placed every row's virtual ids
    mask = padding_mask(kw.get("attention_mask"), x.shape[1], cache)
    loc = located
    if templates is not None and loc.is_encoder_decoder:
        raise ValueError(
            "some rows hold virtual ids (a template) and others do not: with an "
            "encoder-decoder model, give every row of a batch virtual ids or none"
        )
    rows = plan_rows(bank, x.shape[0], x.device, pad_front, templates)
    if rows.width == 0:  # the other rows read prefixes: no soft prompt to insert
        return Plan(None, names)
    at = insertion_points(mask, x.shape[0], loc.cls_first, x.device)
    at_front = rows.uniform and not loc.cls_first and (mask is None or _all_zero(at))
    insertion = Insertion(rows, at, x.shape[1] + rows.width, at_front)
    if names is not None:  # template rows' prompts and the inserted ones
        names = tuple(bank.token_names({*names, *rows.names}))
    return Plan(insertion, rows.names if names is None else names)


def template_rows(
    bank: PromptBank, ids: torch.Tensor
) -> tuple[list[bool] | None, tuple[str, ...] | None]:
    """Which rows already hold virtual ids (``None``: none does), and the
    prompts they use (``None``: not known). Declared with
    ``att.use(template=...)``, else looked at: a host sync, which a
    ``torch.compile`` graph cannot hold, so there an undeclared input is
    taken to hold none and checked on the device instead."""
    declared = bank.template
    compiling = torch.compiler.is_compiling()
    virtual = ids >= bank.vocab_size
    if declared is None and not compiling:
        rows = virtual.any(dim=1).tolist()
        if not any(rows):
            return None, None
        return rows, tuple(bank.names_of_ids(ids))
    holds = virtual.any()
    if declared:
        torch._assert_async(holds, _TEMPLATE_WITHOUT_IDS)
        names = None if compiling else tuple(bank.names_of_ids(ids))
        return [True] * ids.shape[0], names
    torch._assert_async(~holds, _IDS_WITHOUT_TEMPLATE)
    return None, None


def _all_zero(at: torch.Tensor) -> bool:
    """Every row's prompt goes first, so stripping can be a view. Looking is a
    host sync, so compiled graphs skip it and strip by gathering."""
    return not torch.compiler.is_compiling() and not bool(at.any())


def plan_rows(
    bank: PromptBank,
    batch: int,
    device: torch.device,
    pad_front: bool,
    templates: list[bool] | None = None,
) -> Rows:
    """The rows' virtual ids for the call's selection: one prompt for every row,
    or one per row (``att.use([...])``). Rows that use a prefix, or whose input
    already holds virtual ids (``templates``), insert nothing."""
    per_row = bank.per_row(batch)
    names = per_row if per_row is not None else (bank.active(),) * batch
    distinct = list(dict.fromkeys(names))
    # One entry per prompt the rows use, and a last one that inserts nothing.
    entries = [bank.virtual_ids(n) if n in bank.starts else [] for n in distinct] + [[]]
    pick = [
        len(distinct) if templates is not None and templates[b] else distinct.index(name)
        for b, name in enumerate(names)
    ]
    used = sorted(set(pick))
    width = max(len(entries[i]) for i in used)
    table = torch.tensor([e + [0] * (width - len(e)) for e in entries], device=device)
    lengths = torch.tensor([len(e) for e in entries], device=device)
    rows = torch.tensor(pick, device=device)
    uniform = all(len(entries[i]) == width for i in used)
    token_names = bank.token_names(distinct[i] for i in used if entries[i])
    return Rows(
        lengths[rows], table.view(-1, width)[rows], width, pad_front, tuple(token_names), uniform
    )


def uniform_rows(count: int, batch: int, device: torch.device) -> Rows:
    """Rows that each hold ``count`` virtual tokens of unknown ids (a cache some
    other code filled: only its length is known)."""
    counts = torch.full((batch,), count, dtype=torch.long, device=device)
    ids = torch.zeros(batch, count, dtype=torch.long, device=device)
    return Rows(counts, ids, count, True, (), True)


def lengthen(
    kw: Kwargs,
    ins: Insertion,
    embedded: torch.Tensor | None,
    cache: Any,
    takes_positions: bool,
    first_position: int,
    shifted_labels: bool,
) -> None:
    """Insert the plan's virtual tokens into the call's arguments ``kw``
    (``shifted_labels``: see ``lengthen_labels``).

    ``embedded`` holds the virtual tokens' vectors ``(B, width, H)`` when the
    call passes ``inputs_embeds`` (else the ids go in, and the embedding's
    hooks look them up)."""
    rows, at = ins.rows, ins.at
    counts, width, front = rows.counts, rows.width, rows.pad_side
    ids = kw.get("input_ids")
    if ids is not None:
        length = ids.shape[1]
        kw["input_ids"] = insert(ids, at, counts, rows.ids, 0, front)
    else:
        assert embedded is not None
        length = kw["inputs_embeds"].shape[1]
        kw["inputs_embeds"] = insert(kw["inputs_embeds"], at, counts, embedded, 0.0, front)
    # A static cache gets ``width`` more slots, whatever form the mask takes
    # (``generate`` drops an all-ones mask). A no-op for growing caches.
    make_room_everywhere(cache, width)
    mask = padding_mask(kw.get("attention_mask"), length, cache)
    if mask is None and rows.pad_slots:  # pad slots must be masked: a mask of ones
        mask = torch.ones(at.shape[0], length, dtype=torch.long, device=at.device)
    if mask is not None:
        mask = lengthen_mask(mask, at, rows)
    kw["attention_mask"] = mask  # the model builds its masks from it (and the cache)
    positions = kw.get("position_ids")
    if positions is not None:
        kw["position_ids"] = shift_positions(positions, at, counts, width, front)
    elif mask is not None and takes_positions:
        kw["position_ids"] = positions_from_mask(mask, first_position)
    token_types = kw.get("token_type_ids")
    if token_types is not None:
        zeros = torch.zeros_like(rows.ids)
        kw["token_type_ids"] = insert(token_types, at, counts, zeros, 0, front)
    labels = kw.get("labels")
    if labels is not None and labels.ndim == 2 and labels.shape[1] == length:
        kw["labels"] = lengthen_labels(labels, ins, shifted_labels)
    if cache is not None:
        remember(cache, "inserted", rows)


def lengthen_mask(mask: torch.Tensor, at: torch.Tensor, rows: Rows) -> torch.Tensor:
    """A 2-D padding mask with ones at the virtual tokens and zeros at pad slots."""
    ones = torch.ones_like(rows.ids, dtype=mask.dtype)
    return insert(mask, at, rows.counts, ones, 0, rows.pad_side)


def lengthen_labels(labels: torch.Tensor, ins: Insertion, shifted: bool) -> torch.Tensor:
    """Per-token labels with ``-100`` at the virtual tokens (never scored).

    A causal LM loss (``shifted``) predicts ``labels[:, t + 1]`` from position
    ``t``. A row's first real token has no real token before it: alone and
    unpadded it is no target, and in a left-padded row the bare model would
    predict it from a pad. With a prompt in front of it, it would become a
    target predicted from the last virtual token. It is masked in every row,
    so a row's loss is the same padded or alone, and the loss equals the
    shifted cross-entropy of the logits returned (the user's length) with the
    user's labels, whose first real tokens are no targets (unpadded and
    right-padded rows: exactly the user's labels). Where the prompt follows a
    first token that stays first (``[CLS]``-first models, ``at`` past it),
    the token after the prompt has a real predecessor and stays a target."""
    rows, at = ins.rows, ins.at
    if shifted:  # (the callers pass False where the prompt follows a token kept first)
        first = at.clamp(max=labels.shape[1] - 1).unsqueeze(1)  # (B, 1)
        masked = torch.where(rows.counts.unsqueeze(1) > 0, -100, labels.gather(1, first))
        labels = labels.scatter(1, first, masked)
    ignored = torch.full_like(rows.ids, -100)
    return insert(labels, at, rows.counts, ignored, -100, rows.pad_side)


def continue_decoding(
    kw: Kwargs,
    cache: Any,
    past: int,
    new: int,
    cls_first: bool,
    takes_positions: bool,
    first_position: int,
) -> bool:
    """A decode step: the cache holds the virtual tokens; lengthen the step's mask
    and shift its positions to match. Returns whether ``kw`` changed."""
    mask = kw.get("attention_mask")
    rows: Rows | None = recall(cache, "inserted")
    if rows is None:  # a cache we did not fill: trust the mask's length
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or past + new <= mask.shape[1]:
            return False
        count = past + new - mask.shape[1]
        rows = uniform_rows(count, mask.shape[0], mask.device)
        remember(cache, "inserted", rows)  # the next steps read it
    if mask is None and rows.uniform:  # nothing to mask: only explicit positions move
        positions = kw.get("position_ids")
        if positions is None:
            return False
        kw["position_ids"] = positions + rows.counts.unsqueeze(1)
        return True
    user = past + new - prefix_width(cache) - rows.width  # the user's length of keys
    mask = padding_mask(mask, user, cache)
    if mask is None and rows.pad_slots:  # generate drops an all-ones mask; pad slots stay masked
        mask = torch.ones(rows.counts.shape[0], user, dtype=torch.long, device=rows.ids.device)
    if mask is not None and mask.shape[1] == user:
        at = insertion_points(mask, mask.shape[0], cls_first, mask.device)
        mask = lengthen_mask(mask, at, rows)
    kw["attention_mask"] = mask
    positions = kw.get("position_ids")
    if positions is not None:
        kw["position_ids"] = positions + rows.counts.unsqueeze(1)
    elif mask is not None and takes_positions:
        kw["position_ids"] = positions_from_mask(mask, first_position)[:, -new:]
    return True
