"""The model's own activations over a text, read once at attach time.

``init="text"`` starts a prefix from the keys and values every attention site
computes for the text's tokens. They are read in one run of the frozen model
over the text (batch of one, no padding, eval mode, no autograd), through
temporary hooks that are removed before ``text_key_values`` returns, whatever
happens: nothing stays on the user's model.

What is read, per kind of site (``AttentionSite.prefix_in``), is exactly what
the prefix hooks later put in front of the real keys, so a prefix made of it
gives each site the text's keys:

* ``cache``: the module is handed a recording stand-in for its cache; the
  keys and values it stores there are the ones a real cache would hold (after
  rotary embeddings, before grouped heads are repeated);
* ``projections`` (DistilBERT): the outputs of its key and value projections;
* ``inputs`` (``nn.MultiheadAttention``): its ``key`` and ``value`` inputs.

Encoder-decoder models run the encoder over the text and the decoder over the
same ids, so decoder self-attention gets the decoder's keys for the text and
cross-attention the keys of the encoded text.

``fit_last_layer`` then makes a reparameterisation (a prefix MLP, a P-tuning
encoder) output such a table at step 0, in closed form.
"""

from __future__ import annotations

import inspect
from typing import Any, TypeGuard

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..locators.base import AttentionSite, Located
from ..locators.conventions import CACHE_NAMES

#: Per site, keys and values ``(H_kv, T, D)``.
KeyValues = list[tuple[torch.Tensor, torch.Tensor]]


class _Recorder:
    """Stands in for a site's cache during the capture: keeps what the module
    stores and hands it back unchanged, as an empty cache would."""

    def __init__(self, records: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.records = records

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.records.append((key_states, value_states))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def text_ids(tokenizer: Any, text: str, vocab_size: int, count: int | None) -> list[int]:
    """The text's ids (no special tokens), repeated or cut to ``count`` if given."""
    encoded = tokenizer(text, add_special_tokens=False)
    raw = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    ids = [int(i) for i in raw]
    if not ids:
        raise ValueError(f"init_text {text!r} tokenizes to no tokens")
    if max(ids) >= vocab_size or min(ids) < 0:
        raise ValueError(
            f"the tokenizer produced id {max(ids)} but the model's embedding has "
            f"{vocab_size} rows: is it the model's own tokenizer?"
        )
    if count is None:
        return ids
    return (ids * -(-count // len(ids)))[:count]


def text_key_values(located: Located, ids: list[int]) -> KeyValues:
    """Every site's keys and values ``(H_kv, len(ids), D)`` for ``ids``, in site order."""
    limit = located.max_positions
    if limit is not None and len(ids) >= limit:
        raise ValueError(
            f"init_text gives {len(ids)} tokens, but {type(located.model).__name__} embeds at "
            f"most {limit} positions and the prefix takes as many as the text: use a shorter "
            "text or a smaller num_virtual_tokens"
        )
    model = _runner(located)
    records: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in located.sites]
    handles: list[RemovableHandle] = []
    modes = [(m, m.training) for m in model.modules()]
    # nn.TransformerEncoder would pack the text into a nested tensor (a warning, and
    # a layout the attention inputs are not read in): off for the run, as while attached.
    nested = [(m, m.use_nested_tensor) for m in model.modules() if _packs(m)]
    try:
        for site, kept in zip(located.sites, records, strict=True):
            handles += _record(site, kept)
        for encoder, _ in nested:
            encoder.use_nested_tensor = False
        model.eval()  # dropout off: the text's activations, not a noisy draw of them
        with torch.no_grad():
            model(**_inputs(located, ids))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
        for encoder, setting in nested:
            encoder.use_nested_tensor = setting
    out: KeyValues = []
    for site, kept in zip(located.sites, records, strict=True):
        if len(kept) != 1:
            raise RuntimeError(
                f"reading the text's keys and values: the {site.role} attention site of "
                f"layer {site.layer} ({type(site.module).__name__}) stored keys {len(kept)} "
                "times in one run over the text, expected once"
            )
        keys, values = (_heads(x, site) for x in kept[0])
        out.append((keys, values))
    return out


def _packs(module: nn.Module) -> TypeGuard[nn.TransformerEncoder]:
    return isinstance(module, nn.TransformerEncoder) and bool(module.use_nested_tensor)


def _runner(located: Located) -> nn.Module:
    """The module to run over the text: a transformers model's base model when
    it holds every site (a task head may ask more of its input: BART's
    classifier wants an end-of-sequence token), else the model itself."""
    base = getattr(located.model, "base_model", None)
    if isinstance(base, nn.Module) and base is not located.model:
        inside = {id(m) for m in base.modules()}
        if all(id(site.module) in inside for site in located.sites):
            return base
    return located.model


def _inputs(located: Located, ids: list[int]) -> dict[str, Any]:
    device = located.embedding.weight.device
    x = torch.tensor([ids], device=device)
    names = inspect.signature(_runner(located).forward).parameters
    kw: dict[str, Any] = {"input_ids": x}
    if "attention_mask" in names:
        kw["attention_mask"] = torch.ones_like(x)
    if "use_cache" in names:
        kw["use_cache"] = False
    if "decoder_input_ids" in names and any(s.role in ("dec_self", "cross") for s in located.sites):
        kw["decoder_input_ids"] = x  # the decoder reads the text too (see module docstring)
    return kw


def _record(
    site: AttentionSite, kept: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[RemovableHandle]:
    """Temporary hooks that put what ``site`` computes for the text in ``kept``."""
    if site.prefix_in == "inputs":
        return [site.module.register_forward_pre_hook(_mha_inputs(kept), with_kwargs=True)]
    if site.prefix_in == "projections":
        if site.key_proj is None or site.value_proj is None:
            raise TypeError(f"attention site at layer {site.layer} names no key/value projection")
        pair: dict[int, torch.Tensor] = {}

        def projected(part: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                pair[part] = output
                if len(pair) == 2:
                    kept.append((pair.pop(0), pair.pop(1)))

            return hook

        return [
            site.key_proj.register_forward_hook(projected(0)),
            site.value_proj.register_forward_hook(projected(1)),
        ]
    name = site.cache_arg
    if name is None:
        raise TypeError(f"attention site at layer {site.layer} takes no cache argument")
    signature = inspect.signature(site.module.forward)

    def hand_recorder(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        for param in signature.parameters.values():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(kw.pop(param.name, {}))
        for alias in CACHE_NAMES:
            kw.pop(alias, None)
        kw[name] = _Recorder(kept)
        return (), kw

    return [site.module.register_forward_pre_hook(hand_recorder, with_kwargs=True)]


def _mha_inputs(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    names = ("query", "key", "value")

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kw = {**dict(zip(names, args, strict=False)), **kwargs}
        key, value = kw["key"], kw["value"]
        if key.is_nested:  # a model that packs by itself; one unpadded row: nothing is lost
            key, value = key.to_padded_tensor(0.0), value.to_padded_tensor(0.0)
        if key.ndim == 3 and not getattr(module, "batch_first", False):
            key, value = key.transpose(0, 1), value.transpose(0, 1)
        kept.append((key, value))

    return hook


def _heads(x: torch.Tensor, site: AttentionSite) -> torch.Tensor:
    """One run's keys (or values) at ``site`` as ``(H_kv, T, D)``.

    Recorded caches hold ``(1, H, T, D)``; projections and ``nn.MultiheadAttention``
    inputs ``(1, T, H * D)`` (or ``(T, H * D)`` unbatched)."""
    h, d = site.num_kv_heads, site.head_dim
    if site.prefix_in == "cache":
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != h or x.shape[3] != d:
            raise RuntimeError(
                f"reading the text's keys: the {site.role} attention site of layer "
                f"{site.layer} stored keys of shape {tuple(x.shape)}, expected (1, {h}, T, {d})"
            )
        return x[0].detach().float()
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[1] != h * d:
        raise RuntimeError(
            f"reading the text's keys: the {site.role} attention site of layer {site.layer} "
            f"gave {rows.shape[1]} numbers per token, expected {h * d}"
        )
    return rows.view(-1, h, d).transpose(0, 1).detach().float()


def flat_table(kv: KeyValues) -> torch.Tensor:
    """Per-site ``(H, T, D)`` keys and values as one ``(T, width)`` prefix table,
    in ``Prefix``'s layout: per token and site, keys then values."""
    blocks = []
    for keys, values in kv:
        t = keys.shape[1]
        blocks += [keys.transpose(0, 1).reshape(t, -1), values.transpose(0, 1).reshape(t, -1)]
    return torch.cat(blocks, dim=1)


def fit_last_layer(
    layer: nn.Linear, hidden: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Weights of ``layer`` that map ``hidden`` ``(P, n)`` to ``target`` ``(P, m)``.

    Least squares in closed form (float64), the solution closest to the layer's
    current weights: exact when ``[hidden, 1]`` has full row rank (``n >= P``
    and generic activations), and the directions the fit does not pin keep
    their random start, so gradients still reach the layers before it. Returns
    ``(weight, bias, relative residual)``.
    """
    a = torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1).double()
    start = torch.cat([layer.weight.T, layer.bias[None]], dim=0).detach().double()
    goal = target.double()
    x = start + torch.linalg.pinv(a) @ (goal - a @ start)
    weight = x[:-1].T.to(layer.weight.dtype).contiguous()
    bias = x[-1].to(layer.weight.dtype).contiguous()
    fitted = hidden.double() @ weight.double().T + bias.double()
    scale = float(goal.norm()) or 1.0
    residual = float((fitted - goal).norm()) / scale
    return weight, bias, residual
