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
from transformers.models.camembert.modeling_camembert import (
    CamembertForCausalLM,
    CamembertModel,
    CamembertPreTrainedModel,
)
from transformers.models.roberta.modeling_roberta import (
    RobertaForCausalLM,
    RobertaModel,
    RobertaPreTrainedModel,
)
from transformers.models.xlm_roberta.modeling_xlm_roberta import (
    XLMRobertaForCausalLM,
    XLMRobertaModel,
    XLMRobertaPreTrainedModel,
)

from .base import Located, Locator
from .bert import encoder_sites
from .registry import register_locator

_PRETRAINED = (RobertaPreTrainedModel, XLMRobertaPreTrainedModel, CamembertPreTrainedModel)
_BARE = (RobertaModel, XLMRobertaModel, CamembertModel)
_CAUSAL = (RobertaForCausalLM, XLMRobertaForCausalLM, CamembertForCausalLM)


@register_locator
class RobertaLocator(Locator):
    name = "roberta"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, _PRETRAINED)

    def locate(self, model: nn.Module) -> Located:
        stack: Any = model if isinstance(model, _BARE) else model.roberta
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
            shifted_labels=isinstance(model, _CAUSAL),
            first_position=first,
        )
