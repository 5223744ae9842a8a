"""RoBERTa: ``RobertaModel`` and its heads (sequence classification, masked LM,
token classification, ...), and the two families transformers generates from
the same code with their own classes, XLM-RoBERTa and CamemBERT. ``<s>``
(RoBERTa's ``[CLS]``) stays first; prompts go after it.

RoBERTa numbers its positions from ``padding_idx + 1`` (2 for the released
checkpoints): position ``padding_idx`` is reserved for pad tokens. The hooks
number a row's first token from there, and the usable length is the position
table minus that offset (514 - 2 = 512).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Located, Locator
from .bert import encoder_sites
from .classes import ClassNames, named
from .registry import register_locator

#: The modeling module of each family, by its classes' prefix.
_MODULES = {
    "Roberta": "transformers.models.roberta.modeling_roberta",
    "XLMRoberta": "transformers.models.xlm_roberta.modeling_xlm_roberta",
    "Camembert": "transformers.models.camembert.modeling_camembert",
}


def _each(suffix: str) -> ClassNames:
    """``<Family><suffix>`` of every family (``RobertaModel``, ``XLMRobertaModel``, ...)."""
    first, *rest = (named(module, prefix + suffix) for prefix, module in _MODULES.items())
    for names in rest:
        first |= names
    return first


_PRETRAINED = _each("PreTrainedModel")
_BARE = _each("Model")
_CAUSAL = _each("ForCausalLM")


@register_locator
class RobertaLocator(Locator):
    name = "roberta"

    def matches(self, model: nn.Module) -> bool:
        return _PRETRAINED.of(model)

    def locate(self, model: nn.Module) -> Located:
        stack: Any = model if _BARE.of(model) else model.roberta
        sites = encoder_sites(stack)
        embeddings = stack.embeddings
        first = int(embeddings.padding_idx) + 1
        return Located(
            locator=self.name,
            model=model,
            embedding=embeddings.word_embeddings,
            input_stack=stack,
            encoder_mask_readers=(),
            sites=sites,
            max_positions=int(embeddings.position_embeddings.num_embeddings) - first,
            cls_first=True,
            # ``*ForCausalLM`` (``is_decoder=True``) predicts token t + 1 at t.
            shifted_labels=_CAUSAL.of(model),
            first_position=first,
        )
