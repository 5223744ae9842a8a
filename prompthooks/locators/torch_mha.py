"""Plain PyTorch models: ``nn.Embedding`` plus ``nn.MultiheadAttention``.

Covers models written with ``torch.nn`` alone: ``nn.TransformerEncoder`` /
``nn.TransformerDecoder`` / ``nn.Transformer`` (``batch_first`` either way)
or hand-written blocks around ``nn.MultiheadAttention``. It recognises a model
by structure, so it is tried after every class-based locator.

What it expects of the model (the contract a plain module cannot declare):

* ``forward`` takes the token ids as ``input_ids``, shaped ``(batch, length)``,
  and optionally ``attention_mask`` (1 for real tokens, 0 for padding) and
  ``position_ids``; the hooks lengthen these before the body runs, so any
  padding mask the body derives from ``attention_mask`` covers the prompt;
* per-position outputs are ``(batch, length, ...)`` (a tensor, or a tuple or
  dict of them), so soft prompts can be stripped from them;
* the token embedding is the one ``nn.Embedding``, or the one
  ``get_input_embeddings()`` returns when there are several (positions).

Soft prompts enter through the embedding. A prefix enters every
``nn.MultiheadAttention`` in its input space (``AttentionSite.prefix_in`` is
``inputs``): ``(1, P, embed_dim)`` per site. Roles follow the modules that own
the attention: the self- and cross-attention of ``nn.TransformerDecoderLayer``
are ``dec_self`` and ``cross``, an encoder layer's is ``enc_self`` when the
model also has decoder layers, anything else is ``self``.
"""

from __future__ import annotations

import inspect

from torch import nn

from .base import AttentionSite, Located, Locator, Role
from .classes import named
from .registry import register_locator

#: Not imported: ``transformers.modeling_utils`` alone takes longer to import than
#: the rest of prompthooks (a plain PyTorch model needs no transformers at all).
_TRANSFORMERS_MODEL = named("transformers.modeling_utils", "PreTrainedModel")


def _token_embedding(model: nn.Module) -> nn.Embedding:
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        found = getter()
        if isinstance(found, nn.Embedding):
            return found
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if len(embeddings) == 1:
        return embeddings[0][1]
    names = ", ".join(n for n, _ in embeddings) or "none"
    raise TypeError(
        f"{type(model).__name__} has {len(embeddings)} nn.Embedding modules ({names}); "
        "say which one reads the token ids: define get_input_embeddings() on the model "
        "to return it (or register a locator for it, see README 'Teaching prompthooks a "
        "new architecture')"
    )


def _roles(model: nn.Module) -> dict[int, Role]:
    """Roles of the attention modules owned by ``nn.Transformer*Layer`` modules."""
    decoders = [m for m in model.modules() if isinstance(m, nn.TransformerDecoderLayer)]
    encoders = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    roles: dict[int, Role] = {}
    for decoder in decoders:
        roles[id(decoder.self_attn)] = "dec_self"
        roles[id(decoder.multihead_attn)] = "cross"
    for encoder in encoders:
        roles[id(encoder.self_attn)] = "enc_self" if decoders else "self"
    return roles


@register_locator
class TorchMHALocator(Locator):
    name = "torch-mha"
    structural = True

    def matches(self, model: nn.Module) -> bool:
        # A transformers model with an nn.MultiheadAttention somewhere (a vision
        # tower's pooling) is not built from it: its text attention is elsewhere.
        if _TRANSFORMERS_MODEL.of(model):
            return False
        return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())

    def locate(self, model: nn.Module) -> Located:
        if "input_ids" not in inspect.signature(model.forward).parameters:
            raise TypeError(
                f"{type(model).__name__}.forward takes no 'input_ids': the generic "
                "nn.MultiheadAttention locator needs the token ids under that name "
                "(and the padding mask as 'attention_mask') to place prompts; rename the "
                "argument or register a locator (README 'Teaching prompthooks a new "
                "architecture')"
            )
        roles = _roles(model)
        counts: dict[Role, int] = {}
        sites = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.MultiheadAttention):
                continue
            if module.kdim != module.vdim:
                raise TypeError(
                    f"{name}: key width {module.kdim} differs from value width {module.vdim}; "
                    "an input-space prefix needs one width for both"
                )
            role = roles.get(id(module), "self")
            layer = counts.get(role, 0)
            counts[role] = layer + 1
            sites.append(
                AttentionSite(
                    module=module,
                    role=role,
                    layer=layer,
                    num_kv_heads=1,
                    head_dim=int(module.kdim),
                    causal=False,  # the model passes its own masks
                    mask_arg="attn_mask",
                    cache_arg="",
                    prefix_in="inputs",
                )
            )
        return Located(
            locator=self.name,
            model=model,
            embedding=_token_embedding(model),
            input_stack=model,
            encoder_mask_readers=(),
            sites=tuple(sites),
            max_positions=None,  # positions are the model's own business
            is_encoder_decoder="cross" in counts,
            # right padded and never generating: a pad slot in front would be a causal
            # query with no key, which nn.MultiheadAttention turns into NaN
            pad_slots_last=True,
        )
