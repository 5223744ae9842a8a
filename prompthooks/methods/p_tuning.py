"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual-token vectors
produced by a small prompt encoder instead of trained directly.

The encoder is the paper's: an embedding of the P pseudo tokens, a
bidirectional LSTM (``hidden/2`` units per direction, so its output is
``hidden`` wide) that lets neighbouring pseudo tokens depend on each other,
and a two-layer ReLU MLP back to the model's width; or the MLP alone. It runs
once per forward call (the whole table at once, shared by every row). After
training, ``export()`` keeps only its output, as the paper does: a plain
``(P, hidden)`` table, the same thing Prompt Tuning trains.

Pseudo tokens can sit anywhere in the input (the paper's templates): place
``att.virtual_ids()`` where they belong, see ``prompthooks.templates``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn

from ..locators.base import Located
from .activations import fit_last_layer, text_ids
from .base import (
    SoftPrompt,
    check_num_virtual_tokens,
    check_text_init,
    config_choice,
    config_fraction,
    config_int,
)
from .prompt_tuning import PromptTable, looked_up

log = logging.getLogger("prompthooks")

Encoder = Literal["lstm", "mlp"]
Init = Literal["random", "text"]


class PromptEncoder(nn.Module):
    """Embedding -> (bidirectional LSTM) -> two-layer ReLU MLP."""

    def __init__(
        self,
        num_virtual_tokens: int,
        width: int,
        hidden: int,
        encoder: Encoder,
        num_layers: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, width)
        self.lstm: nn.LSTM | None = None
        if encoder == "lstm":
            self.lstm = nn.LSTM(
                input_size=width,
                hidden_size=hidden // 2,
                num_layers=num_layers,
                dropout=dropout if num_layers > 1 else 0.0,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp = nn.Sequential(
                nn.Linear(2 * (hidden // 2), hidden), nn.ReLU(), nn.Linear(hidden, width)
            )
        else:
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))

    def features(self) -> torch.Tensor:
        """What the last linear layer reads: ``(P, hidden)``."""
        x = self.embedding.weight
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        out: torch.Tensor = self.mlp[1](self.mlp[0](x))
        return out

    def forward(self) -> torch.Tensor:
        out: torch.Tensor = self.mlp[2](self.features())
        return out

    def fit_output(self, target: torch.Tensor) -> float:
        """Set the last layer so that the encoder's output (in eval mode, no
        dropout) is ``target``; closed form, see ``fit_last_layer``. Returns
        the relative residual."""
        last = self.mlp[2]
        assert isinstance(last, nn.Linear)
        mode = self.training
        try:
            self.eval()
            with torch.no_grad():
                weight, bias, residual = fit_last_layer(last, self.features(), target)
                last.weight.copy_(weight)
                last.bias.copy_(bias)
        finally:
            self.train(mode)
        return residual


class PTuningPrompt(SoftPrompt):
    """A soft prompt whose table is the prompt encoder's output."""

    method = "p_tuning"

    def __init__(self, encoder: PromptEncoder, settings: dict[str, Any]) -> None:
        super().__init__()
        self.encoder = encoder
        self.settings = dict(settings)
        #: Relative residual of ``init="text"``'s closed-form fit (``None``: no fit).
        self.init_residual: float | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.encoder.embedding.num_embeddings)

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.embedding.embedding_dim)

    def table(self) -> torch.Tensor:
        out: torch.Tensor = self.encoder()
        return out

    def export(self) -> PromptTable:
        with torch.no_grad():
            exported = PromptTable(self.table().detach().clone())
        exported.trained_for = self.trained_for
        return exported

    def config(self) -> dict[str, Any]:
        return {**super().config(), **self.settings}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PTuningPrompt:
        """An untrained encoder of the saved shape (``ph.load`` fills its weights)."""
        settings: dict[str, Any] = {
            "encoder": config_choice(config, "encoder", ("lstm", "mlp")),
            "encoder_hidden_size": config_int(config, "encoder_hidden_size"),
            "num_layers": config_int(config, "num_layers"),
            "dropout": config_fraction(config, "dropout"),
        }
        encoder = PromptEncoder(
            config_int(config, "num_virtual_tokens"),
            config_int(config, "hidden_size"),
            settings["encoder_hidden_size"],
            settings["encoder"],
            settings["num_layers"],
            settings["dropout"],
        )
        return cls(encoder, settings)


class PTuning:
    """Spec for P-tuning; sized from the model when attached.

    Args:
        num_virtual_tokens: number of pseudo tokens P; ``None`` is 9, or the
            text's length with ``init="text"``.
        encoder: ``"lstm"`` (embedding, bidirectional LSTM, MLP) or ``"mlp"``.
        hidden_size: the encoder's width; defaults to the model's hidden size.
        num_layers: LSTM layers.
        dropout: dropout between LSTM layers (training only).
        init: ``"random"`` (PyTorch's default init of the encoder) or ``"text"``:
            the encoder's last layer is fitted in closed form so that its
            output is the model's embeddings of ``init_text``'s tokens (ids
            without special tokens, repeated or cut to ``num_virtual_tokens``
            when it is given): the prompt starts as that text typed in its
            place. Exact when ``hidden_size >= P``; the fit's relative residual
            is kept as ``prompt.init_residual``.
        init_text, tokenizer: the text and the model's tokenizer, for ``"text"``.
    """

    def __init__(
        self,
        num_virtual_tokens: int | None = None,
        encoder: Encoder = "lstm",
        hidden_size: int | None = None,
        num_layers: int = 2,
        dropout: float = 0.0,
        init: Init = "random",
        init_text: str | None = None,
        tokenizer: Any = None,
    ) -> None:
        if init not in ("random", "text"):
            raise ValueError(f"init must be 'random' or 'text', got {init!r}")
        check_text_init(init, init_text, tokenizer, "PTuning")
        if num_virtual_tokens is not None or init != "text":
            num_virtual_tokens = check_num_virtual_tokens(
                9 if num_virtual_tokens is None else num_virtual_tokens
            )
        if encoder not in ("lstm", "mlp"):
            raise ValueError(f"encoder must be 'lstm' or 'mlp', got {encoder!r}")
        if hidden_size is not None and (
            isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 2
        ):
            raise ValueError(f"hidden_size must be an integer >= 2 or None, got {hidden_size!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_virtual_tokens: int | None = num_virtual_tokens
        self.encoder = encoder
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        self.init: Init = init
        self.init_text = init_text
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return (
            f"PTuning(num_virtual_tokens={self.num_virtual_tokens}, encoder={self.encoder!r}, "
            f"hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
            f"dropout={self.dropout}, init={self.init!r})"
        )

    def build(self, located: Located) -> PTuningPrompt:
        hidden = self.hidden_size or located.hidden_size
        target: torch.Tensor | None = None
        if self.init == "text":
            assert self.init_text is not None
            ids = text_ids(
                self.tokenizer, self.init_text, located.vocab_size, self.num_virtual_tokens
            )
            target = looked_up(located.embedding, torch.tensor(ids))
        n = self.num_virtual_tokens if target is None else target.shape[0]
        assert n is not None
        device = located.embedding.weight.device
        encoder = PromptEncoder(
            n, located.hidden_size, hidden, self.encoder, self.num_layers, self.dropout
        ).to(device)
        residual = None if target is None else encoder.fit_output(target)
        if residual is not None:
            log.info("PTuning(init='text'): encoder fit relative residual %.2e", residual)
        settings = {
            "encoder": self.encoder,
            "encoder_hidden_size": hidden,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
        }
        prompt = PTuningPrompt(encoder, settings)
        prompt.init_residual = residual
        return prompt
