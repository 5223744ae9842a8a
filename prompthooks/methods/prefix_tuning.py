"""Prefix Tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): learned
keys and values in front of every attention site of a frozen model.

A prefix is one flat ``(P, sum over sites of 2 * H_kv * D)`` table. Site
``s`` reads its block of columns as ``(2, H_kv, D)`` per virtual token: keys
first, then values. For models whose sites all have the same shape this is
exactly PEFT's ``prompt_embeddings`` layout, ``view(P, L, 2, H_kv, D)``.

With ``projection=True`` the table is not trained directly but produced by the
paper's reparameterisation: a ``(P, hidden)`` embedding, then Linear -> Tanh ->
Linear. The paper found it stabilises training; it is only a training aid, so
``export()`` replaces it by the table it produces.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..locators.base import Located
from .activations import fit_last_layer, flat_table, text_ids, text_key_values
from .base import (
    SoftPrompt,
    check_num_virtual_tokens,
    check_positions,
    check_text_init,
    check_trained_for,
    config_bool,
    config_int,
)

log = logging.getLogger("prompthooks")

Init = Literal["random", "text", "zero"]

#: Shape of one attention site's keys for one token: (KV heads, head size).
SiteShape = tuple[int, int]


def site_shapes(located: Located) -> list[SiteShape]:
    return [(s.num_kv_heads, s.head_dim) for s in located.sites]


class PrefixProjection(nn.Module):
    """The MLP reparameterisation: embedding -> Linear -> Tanh -> Linear."""

    def __init__(self, num_virtual_tokens: int, embed_dim: int, hidden: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, embed_dim)
        self.transform = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, width)
        )

    def forward(self) -> torch.Tensor:
        out: torch.Tensor = self.transform(self.embedding.weight)
        return out


class Prefix(SoftPrompt):
    """Keys and values for every attention site, from a table or a projection."""

    method = "prefix_tuning"
    kind = "prefix"

    def __init__(
        self,
        shapes: Sequence[SiteShape],
        *,
        table: torch.Tensor | None = None,
        projection: PrefixProjection | None = None,
        shift_positions: bool = True,
    ) -> None:
        super().__init__()
        self.shapes = [(int(h), int(d)) for h, d in shapes]
        if not self.shapes:
            raise ValueError("a prefix needs at least one attention site")
        if (table is None) == (projection is None):
            raise ValueError("a prefix is made from exactly one of a table or a projection")
        self.shift_positions = bool(shift_positions)
        #: Relative residual of the closed-form MLP fit of ``init="text"`` /
        #: ``"zero"`` (``None``: no fit was made).
        self.init_residual: float | None = None
        self.weight: nn.Parameter | None = None
        self.projection: PrefixProjection | None = projection
        if table is not None:
            if table.ndim != 2 or table.shape[1] != self.width:
                raise ValueError(
                    f"a prefix table for {len(self.shapes)} sites of shapes {self.shapes} has "
                    f"shape (P, {self.width}), got {tuple(table.shape)}"
                )
            self.weight = nn.Parameter(table.detach().clone().float())
        assert projection is not None or self.weight is not None
        self._count = (
            int(table.shape[0])
            if table is not None
            else int(
                projection.embedding.num_embeddings  # type: ignore[union-attr]
            )
        )

    @property
    def width(self) -> int:
        """Numbers per virtual token: ``2 * H_kv * D`` summed over the sites."""
        return sum(2 * h * d for h, d in self.shapes)

    @property
    def num_virtual_tokens(self) -> int:
        return self._count

    def flat(self) -> torch.Tensor:
        """The ``(P, width)`` table the attention sites read."""
        if self.weight is not None:
            return self.weight
        assert self.projection is not None
        table: torch.Tensor = self.projection()
        return table

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per site, keys and values of shape ``(H_kv, P, D)``: one pass over the table."""
        flat = self.flat()
        p = flat.shape[0]
        if len(set(self.shapes)) == 1:  # the common case: one view, no copies
            h, d = self.shapes[0]
            kv = flat.view(p, len(self.shapes), 2, h, d).permute(1, 2, 3, 0, 4)
            return [(kv[s, 0], kv[s, 1]) for s in range(len(self.shapes))]
        out, start = [], 0
        for h, d in self.shapes:
            block = flat[:, start : start + 2 * h * d].reshape(p, 2, h, d).permute(1, 2, 0, 3)
            out.append((block[0], block[1]))
            start += 2 * h * d
        return out

    def export(self) -> Prefix:
        if self.projection is None:
            return self
        with torch.no_grad():
            table = self.flat().detach().clone()
        exported = Prefix(self.shapes, table=table, shift_positions=self.shift_positions)
        exported.trained_for = self.trained_for
        return exported

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "method": self.method,
            "num_virtual_tokens": self.num_virtual_tokens,
            "site_shapes": [list(s) for s in self.shapes],
            "shift_positions": self.shift_positions,
        }
        if self.projection is not None:
            config["projection"] = {
                "embed_dim": self.projection.embedding.embedding_dim,
                "hidden_size": self.projection.transform[0].out_features,
            }
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Prefix:
        """An untrained prefix of the saved shape (``ph.load`` fills its weights)."""
        sites = config["site_shapes"]
        if not isinstance(sites, list) or not sites:
            raise ValueError(
                f"field 'site_shapes' must be a list of [kv_heads, head_dim], got {sites!r}"
            )
        shapes = []
        for site in sites:
            if not isinstance(site, list) or len(site) != 2:
                raise ValueError(f"field 'site_shapes' holds {site!r}, not [kv_heads, head_dim]")
            pair = dict(zip(("kv_heads", "head_dim"), site, strict=True))
            shapes.append((config_int(pair, "kv_heads"), config_int(pair, "head_dim")))
        shift = config_bool(config, "shift_positions", True)
        count = config_int(config, "num_virtual_tokens")
        width = sum(2 * h * d for h, d in shapes)
        if "projection" not in config:
            return cls(shapes, table=torch.zeros(count, width), shift_positions=shift)
        proj = config["projection"]
        if not isinstance(proj, dict):
            raise ValueError(f"field 'projection' must be an object, got {proj!r}")
        projection = PrefixProjection(
            count, config_int(proj, "embed_dim"), config_int(proj, "hidden_size"), width
        )
        return cls(shapes, projection=projection, shift_positions=shift)

    def check_fits(self, located: Located) -> None:
        check_trained_for(self, located)
        check_positions(self, located)
        expected = site_shapes(located)
        if expected != self.shapes:
            raise ValueError(
                f"this prefix was made for {len(self.shapes)} attention sites with "
                f"(kv_heads, head_dim) {_summary(self.shapes)}, but "
                f"{type(located.model).__name__} has {len(expected)} sites with "
                f"{_summary(expected)}: prefix table shape (P, {self.width}) vs expected "
                f"(P, {sum(2 * h * d for h, d in expected)})"
            )

    def extra_repr(self) -> str:
        how = "projection" if self.projection is not None else "table"
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, sites={len(self.shapes)}, "
            f"width={self.width}, from={how}, shift_positions={self.shift_positions}"
        )


def _summary(shapes: Sequence[SiteShape]) -> str:
    distinct = sorted(set(shapes))
    return ", ".join(f"{shapes.count(s)} x {s}" for s in distinct)


class PrefixTuning:
    """Spec for Prefix Tuning; sized from the model's attention sites when attached.

    Args:
        num_virtual_tokens: prefix length P; ``None`` is 10, or the text's
            length with ``init="text"``.
        projection: train through the paper's MLP reparameterisation
            (``False`` is P-tuning v2, the recommended setting for BERT-like
            encoders).
        hidden_size: width of the MLP's hidden layer.
        shift_positions: real tokens take positions ``P..P+L-1``, as PEFT and
            the original code do (the prefix acts as a past of length P).
            ``False`` keeps them at ``0..L-1``. Models with relative positions
            (T5) always see the prefix as a past.
        init: ``"random"`` (N(0, 1) table, or the MLP's default init);
            ``"text"``: the keys and values the frozen model computes for
            ``init_text`` at every attention site, so training starts from the
            text typed in front of the input (exactly so on decoder-only models
            with ``shift_positions=True``); ``"zero"``: zero keys and values
            (each prefix slot still takes the softmax weight of a score-0 key;
            see the README). With the MLP, its last layer is fitted in closed
            form so that it outputs that table; the fit's relative residual is
            kept as ``prompt.init_residual``.
        init_text, tokenizer: the text and the model's tokenizer, for ``"text"``.
            The ids (no special tokens) are repeated or cut to
            ``num_virtual_tokens`` when it is given.
    """

    def __init__(
        self,
        num_virtual_tokens: int | None = None,
        projection: bool = True,
        hidden_size: int = 512,
        shift_positions: bool = True,
        init: Init = "random",
        init_text: str | None = None,
        tokenizer: Any = None,
    ) -> None:
        if init not in ("random", "text", "zero"):
            raise ValueError(f"init must be 'random', 'text' or 'zero', got {init!r}")
        check_text_init(init, init_text, tokenizer, "PrefixTuning")
        if num_virtual_tokens is not None or init != "text":
            num_virtual_tokens = check_num_virtual_tokens(
                10 if num_virtual_tokens is None else num_virtual_tokens
            )
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be an integer >= 1, got {hidden_size!r}")
        self.num_virtual_tokens: int | None = num_virtual_tokens
        self.projection = bool(projection)
        self.hidden_size = hidden_size
        self.shift_positions = bool(shift_positions)
        self.init: Init = init
        self.init_text = init_text
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return (
            f"PrefixTuning(num_virtual_tokens={self.num_virtual_tokens}, "
            f"projection={self.projection}, hidden_size={self.hidden_size}, "
            f"shift_positions={self.shift_positions}, init={self.init!r})"
        )

    def build(self, located: Located) -> Prefix:
        if not located.sites:
            raise ValueError(
                f"the {located.locator!r} locator lists no attention sites for "
                f"{type(located.model).__name__}, so a prefix has nowhere to go; "
                "use ph.PromptTuning, or a locator that fills Located.sites"
            )
        shapes = site_shapes(located)
        device = located.embedding.weight.device
        width = sum(2 * h * d for h, d in shapes)
        target: torch.Tensor | None = None
        if self.init == "text":
            assert self.init_text is not None
            ids = text_ids(
                self.tokenizer, self.init_text, located.vocab_size, self.num_virtual_tokens
            )
            target = flat_table(text_key_values(located, ids)).to(device)
        n = self.num_virtual_tokens if target is None else target.shape[0]
        assert n is not None
        if self.init == "zero":
            target = torch.zeros(n, width, device=device)
        if not self.projection:
            # nn.Embedding's N(0, 1), as PEFT and the P-tuning v2 code initialise it.
            table = torch.randn(n, width, device=device) if target is None else target
            return Prefix(shapes, table=table, shift_positions=self.shift_positions)
        projection = PrefixProjection(n, located.hidden_size, self.hidden_size, width).to(device)
        residual = None
        if target is not None:
            last = projection.transform[2]
            assert isinstance(last, nn.Linear)
            with torch.no_grad():
                hidden = projection.transform[:2](projection.embedding.weight)
                weight, bias, residual = fit_last_layer(last, hidden, target)
                last.weight.copy_(weight)
                last.bias.copy_(bias)
            log.info("PrefixTuning(init=%r): MLP fit relative residual %.2e", self.init, residual)
        prefix = Prefix(shapes, projection=projection, shift_positions=self.shift_positions)
        prefix.init_residual = residual
        return prefix
