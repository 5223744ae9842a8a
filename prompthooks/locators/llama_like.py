"""Decoder-only transformers models laid out like LLaMA, recognised by structure.

Mistral, Mixtral, Qwen2/3, Gemma, Gemma 2/3, Phi-3, Granite, Olmo, Cohere and
many more share LLaMA's layout: a stack (the model or its ``.model``) with
``embed_tokens`` and ``layers``, each layer a ``self_attn`` module with a
``head_dim`` whose forward takes ``attention_mask`` and a cache it calls
``update(k, v, layer_idx)`` on (``past_key_values`` up to transformers 5.23,
``cache`` from 5.24: any name in ``conventions.CACHE_NAMES``). Naming every such class would
miss the next family, so this locator checks the layout itself: key/value
heads come from the key projection (or a fused ``qkv_proj``), sliding windows
from the module or the config. It refuses what the prefix hooks could not
serve (latent attention whose keys and values differ in width, hybrid stacks
with recurrent or convolution layers, chunked attention, encoder-decoders),
leaving those to another locator or to ``UnsupportedModelError``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import AttentionSite, Located, Locator
from .conventions import CACHE_NAMES, named_parameters
from .registry import register_locator

#: Keyword arguments the stack's forward must take (and a cache under any of its
#: names): the token hooks rewrite them.
_STACK_ARGS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")
#: Keyword arguments every attention module's forward must take (and a cache):
#: the prefix hooks replace the cache and pad the 4-D mask.
_ATTENTION_ARGS = ("attention_mask",)


def _takes(module: nn.Module, names: tuple[str, ...]) -> bool:
    """The module's forward names every one of ``names`` and a cache as parameters."""
    params = named_parameters(module)
    return all(n in params for n in names) and any(n in params for n in CACHE_NAMES)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _kv_heads(attn: nn.Module, head_dim: int) -> int | None:
    """Key/value heads read from the projections, or ``None`` if they do not add up.

    Separate projections (``k_proj``, ``v_proj``): their widths. A fused
    ``qkv_proj`` (Phi-3) holds queries, keys and values side by side; the query
    width is ``o_proj``'s input, the rest is split evenly between keys and
    values, and the module's own head count must agree.
    """
    k_proj, v_proj = getattr(attn, "k_proj", None), getattr(attn, "v_proj", None)
    if isinstance(k_proj, nn.Module) and isinstance(v_proj, nn.Module):
        k_out, v_out = (
            _int(getattr(k_proj, "out_features", None)),
            _int(getattr(v_proj, "out_features", None)),
        )
        if k_out is None or k_out != v_out or k_out % head_dim:
            return None
        return k_out // head_dim
    qkv, o_proj = getattr(attn, "qkv_proj", None), getattr(attn, "o_proj", None)
    if isinstance(qkv, nn.Module) and isinstance(o_proj, nn.Module):
        fused, queries = (
            _int(getattr(qkv, "out_features", None)),
            _int(getattr(o_proj, "in_features", None)),
        )
        if fused is None or queries is None or (fused - queries) % (2 * head_dim):
            return None
        kv = (fused - queries) // (2 * head_dim)
        declared = _int(getattr(attn, "num_key_value_heads", None))
        if declared is None:
            declared = _int(getattr(getattr(attn, "config", None), "num_key_value_heads", None))
        if kv < 1 or (declared is not None and declared != kv):
            return None
        return kv
    return None


def _attention(layer: nn.Module) -> tuple[nn.Module, int, int] | None:
    """A layer's self-attention with its key head count and size, if readable."""
    attn = getattr(layer, "self_attn", None)
    if not isinstance(attn, nn.Module) or not _takes(attn, _ATTENTION_ARGS):
        return None
    head_dim = _int(getattr(attn, "head_dim", None))
    if head_dim is None or head_dim < 1:
        return None
    kv = _kv_heads(attn, head_dim)
    return None if kv is None or kv < 1 else (attn, kv, head_dim)


#: Layer types whose masks the prefix hooks reproduce (``config.layer_types``).
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _windows(config: Any, layers: int) -> list[int | None] | None:
    """Each layer's sliding window, as transformers derives it from the config
    (``layer_types``, else ``sliding_window`` for every layer, as in Mistral);
    ``None`` for a layout whose masks the prefix hooks cannot reproduce
    (chunked attention, linear or recurrent layers)."""
    window = _int(getattr(config, "sliding_window", None))
    types = getattr(config, "layer_types", None)
    if getattr(config, "attention_chunk_size", None) is not None:
        return None
    if types is None:
        return [window] * layers
    if len(types) < layers or any(t not in _LAYER_TYPES for t in types[:layers]):
        return None
    if window is None and "sliding_attention" in types[:layers]:
        return None
    return [window if t == "sliding_attention" else None for t in types[:layers]]


def _stack(model: nn.Module) -> nn.Module | None:
    """The model itself or its ``.model`` if it has the LLaMA layout."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return None
    for candidate in (model, getattr(model, "model", None)):
        if not isinstance(candidate, nn.Module):
            continue
        embed, layers = getattr(candidate, "embed_tokens", None), getattr(candidate, "layers", None)
        if (
            isinstance(embed, nn.Embedding)
            and isinstance(layers, nn.ModuleList)
            and len(layers) > 0
            and _takes(candidate, _STACK_ARGS)
            and not getattr(getattr(candidate, "config", None), "is_encoder_decoder", False)
            and all(_attention(layer) is not None for layer in layers)
            and _windows(getattr(candidate, "config", None), len(layers)) is not None
        ):
            return candidate
    return None


@register_locator
class LlamaLikeLocator(Locator):
    """Any decoder-only stack with LLaMA's module layout (see the module docstring)."""

    name = "llama-like"
    structural = True

    def matches(self, model: nn.Module) -> bool:
        return _stack(model) is not None

    def locate(self, model: nn.Module) -> Located:
        stack = _stack(model)
        if stack is None:
            raise TypeError(f"{type(model).__name__} does not have the LLaMA layout")
        config = getattr(stack, "config", None)
        layers = stack.layers
        assert isinstance(layers, nn.ModuleList)  # checked by _stack, as is what follows
        windows = _windows(config, len(layers))
        assert windows is not None
        sites = []
        for i, layer in enumerate(layers):
            found = _attention(layer)
            assert found is not None
            attn, kv, head_dim = found
            # The cache slot the module updates is its own layer_idx.
            index = _int(getattr(attn, "layer_idx", None))
            causal = getattr(attn, "is_causal", True)
            # A module that names its own window (Gemma 2/3, Qwen2/3) passes that one
            # to its attention function; the others read the config's.
            window = _int(attn.sliding_window) if hasattr(attn, "sliding_window") else windows[i]
            sites.append(
                AttentionSite(
                    attn,
                    "self",
                    i if index is None else index,
                    kv,
                    head_dim,
                    causal=bool(causal),
                    window=window,
                )
            )
        max_pos = _int(getattr(config, "max_position_embeddings", None))
        embedding = stack.embed_tokens
        assert isinstance(embedding, nn.Embedding)
        return Located(
            locator=self.name,
            model=model,
            embedding=embedding,
            input_stack=stack,
            encoder_mask_readers=(),
            sites=tuple(sites),
            max_positions=max_pos,
            shifted_labels=hasattr(model, "lm_head"),  # a language-model head
        )
