"""The conformance registry: every model family the suite covers, in one place.

Each entry says how to build the family's tiny model (the configs the family
files have always used), which locator serves it (the README's "Architectures"
table names locators), its padding side, its kind, the attention sites it has,
how to make a batch and its decoder inputs, and its two independent oracles
(Prompt Tuning: the model fed ``inputs_embeds`` built by hand, or a float64
recomputation; prefix: a hand-filled cache or a hand-written forward). None
of the oracles calls prompthooks.

``not_applicable`` names the properties of ``tests/test_conformance.py`` that
do not apply to a family, as ``"property"`` or ``"property[method]"``, each with
its reason: those cells are not collected, and the conformance table prints
them as ``n/a (reason)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import prompthooks as ph
from tests.support import models
from tests.support.builders import (
    encoder_batch,
    left_padded,
    tiny_bart,
    tiny_causal,
    tiny_encoder,
    tiny_llama_like,
)
from tests.support.oracle import (
    bart_prompt_oracle,
    causal_prompt_oracle,
    encoder_prompt_oracle,
    kept,
    oracle_logits,
)
from tests.support.plain_models import PlainLM, PlainSeq2Seq, plain_batch, reference
from tests.support.prefix_oracle import (
    bart_logits,
    decoder_only_logits,
    distilbert_prefix_oracle,
    roberta_prefix_oracle,
    t5_logits,
)

PROPERTIES = (
    "oracle",
    "padded",
    "detach",
    "gradients",
    "cache",
    "static",
    "mixed",
    "save_load",
    "peft",
)
METHODS = ("prompt", "prefix")
KINDS = ("decoder-only", "encoder", "encoder-decoder", "plain")

Batch = tuple[torch.Tensor, torch.Tensor]
#: (model, ids, mask, table, labels, extra call kwargs) -> (logits at the user's
#: positions, loss or None)
PromptOracle = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Any, dict[str, Any]],
    tuple[torch.Tensor, torch.Tensor | None],
]
#: (model, ids, mask, table, shift_positions, extra call kwargs) -> logits
PrefixOracle = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, bool, dict[str, Any]], torch.Tensor
]


@dataclass(frozen=True)
class Family:
    """One row of the conformance matrix."""

    name: str
    locator: str
    kind: str
    padding: str
    sites: tuple[str, ...]
    build: Callable[[str], nn.Module]  # attention implementation -> tiny model, eval mode
    make_batch: Callable[[list[int], int], Batch]  # lengths, seed -> ids, mask
    prompt_oracle: PromptOracle
    prefix_oracle: PrefixOracle
    #: attention implementations (a plain model: its layers' layout); the oracle and
    #: padded cells run each, the others the last
    attns: tuple[str, ...] = ("eager", "sdpa")
    shifts: tuple[bool, ...] = (True, False)  # shift_positions values the prefix oracle covers
    decoder: Callable[[int], torch.Tensor] | None = None  # decoder ids for B rows
    losses: bool = True  # the model takes ``labels`` and the prompt oracle returns the loss
    atol: float = 1e-5
    prompt_scale: float = 1.0
    min_length: int = 1
    not_applicable: dict[str, str] = field(default_factory=dict)
    #: properties that apply but fail today (findings, not hidden): collected as
    #: strict xfails, so a fix shows up as an unexpected pass
    known_failures: dict[str, str] = field(default_factory=dict)

    def failure(self, prop: str, method: str) -> str | None:
        """The finding that makes ``prop`` fail for ``method``, if it is a known one."""
        return self.known_failures.get(f"{prop}[{method}]", self.known_failures.get(prop))

    def reason(self, prop: str, method: str | None = None) -> str | None:
        """Why ``prop`` (for ``method``) does not apply, or None when it does."""
        if method is not None and f"{prop}[{method}]" in self.not_applicable:
            return self.not_applicable[f"{prop}[{method}]"]
        return self.not_applicable.get(prop)

    @property
    def generates(self) -> bool:
        return self.kind in ("decoder-only", "encoder-decoder")

    def extra(self, batch: int) -> dict[str, Any]:
        """Call keywords besides ids and mask: an encoder-decoder's decoder inputs."""
        return {} if self.decoder is None else {"decoder_input_ids": self.decoder(batch)}

    def labels(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        if not self.losses:
            return None
        if self.kind == "encoder-decoder":
            return models.decoder_ids(ids.shape[0], 4, seed=9)
        return ids.masked_fill(mask == 0, -100)

    def token_level(self) -> bool:
        """Outputs per user position (compared where the mask is 1); an
        encoder-decoder's logits are per decoder position (compared whole)."""
        return self.decoder is None


def logits_of(out: Any) -> torch.Tensor:
    """A plain model returns its logits; a transformers model an output object."""
    result: torch.Tensor = out if isinstance(out, torch.Tensor) else out.logits
    return result


# -- oracle adapters ----------------------------------------------------------------


def _inputs_embeds_oracle(arch: str) -> PromptOracle:
    def oracle(
        model: nn.Module,
        ids: torch.Tensor,
        mask: torch.Tensor,
        table: torch.Tensor,
        labels: Any,
        extra: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return oracle_logits(model, arch, ids, mask, table, labels, **extra)

    return oracle


def _causal_oracle(family: str) -> PromptOracle:
    def oracle(
        model: nn.Module,
        ids: torch.Tensor,
        mask: torch.Tensor,
        table: torch.Tensor,
        labels: Any,
        extra: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = causal_prompt_oracle(model, family, ids, mask, table, labels)
        return out.logits, out.loss

    return oracle


def _encoder_oracle(family: str) -> PromptOracle:
    def oracle(
        model: nn.Module,
        ids: torch.Tensor,
        mask: torch.Tensor,
        table: torch.Tensor,
        labels: Any,
        extra: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, keep = encoder_prompt_oracle(model, family, ids, mask, table, labels)
        return kept(out.logits, keep), out.loss

    return oracle


def _bart_oracle(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    labels: Any,
    extra: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = bart_prompt_oracle(model, ids, mask, table, labels=labels, **extra)
    return out.logits, out.loss


def _plain_prompt_oracle(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    labels: Any,
    extra: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float64 recomputation, the prompt in front of each (right-padded) row."""
    p, b = table.shape[0], ids.shape[0]
    tok = model.get_input_embeddings()
    embeds = torch.cat([table.expand(b, -1, -1), tok(ids)], dim=1).detach()
    wide = torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], dim=1)
    sites = len(ph.locate(model).sites)
    out = reference(model, embeds, wide, [None] * sites, extra.get("decoder_input_ids"))
    return (out[:, p:] if isinstance(model, PlainLM) else out), None


def _decoder_only_prefix(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    shift: bool,
    extra: dict[str, Any],
) -> torch.Tensor:
    site = ph.locate(model).sites[0]
    return decoder_only_logits(model, ids, mask, table, site.num_kv_heads, site.head_dim, shift)


def _roberta_prefix(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    shift: bool,
    extra: dict[str, Any],
) -> torch.Tensor:
    return logits_of(roberta_prefix_oracle(model, ids, mask, table, shift))


def _distilbert_prefix(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    shift: bool,
    extra: dict[str, Any],
) -> torch.Tensor:
    logits = distilbert_prefix_oracle(model, ids, mask, table, shift)[1]
    assert logits is not None
    return logits


def _t5_prefix(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    shift: bool,
    extra: dict[str, Any],
) -> torch.Tensor:
    return t5_logits(model, ids, mask, extra["decoder_input_ids"], table)


def _bart_prefix(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    shift: bool,
    extra: dict[str, Any],
) -> torch.Tensor:
    return bart_logits(model, ids, mask, extra["decoder_input_ids"], table, shift)


def _plain_prefix(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    shift: bool,
    extra: dict[str, Any],
) -> torch.Tensor:
    """The float64 recomputation given each site's prefix in its input space."""
    sites = ph.locate(model).sites
    p, width = table.shape[0], sites[0].head_dim
    view = table.view(p, len(sites), 2, width)
    per_site: list[Any] = [(view[:, s, 0], view[:, s, 1]) for s in range(len(sites))]
    embeds = model.get_input_embeddings()(ids).detach()
    return reference(model, embeds, mask, per_site, extra.get("decoder_input_ids"))


# -- the registry ---------------------------------------------------------------------

SLIDING = (
    "the prefix sits before a row's padding (where generate caches it), so in a "
    "sliding-window layer a padded row loses it sooner than the row alone (README: "
    "Architectures)"
)
ENCODER = "an encoder: nothing is decoded, no cache"
PEFT_CLS = "PEFT puts the prompt in front of [CLS], prompthooks after it"


def _batch(arch: str) -> Callable[[list[int], int], Batch]:
    return lambda lengths, seed: models.batch(arch, lengths, seed=seed)


def _decoder(batch: int) -> torch.Tensor:
    return models.decoder_ids(batch, 4)


def _plain_decoder(batch: int) -> torch.Tensor:
    return torch.randint(1, 29, (batch, 3), generator=torch.Generator().manual_seed(1))


STATIC_SLIDING = {
    "static": (
        "refused (NotImplementedError): generate hands Mistral's stack one sliding-window "
        "mask for its static cache, which hides the padding outside the window, so the "
        "hooks cannot read it back (before the refusal: prompted tokens differed from the "
        "dynamic cache's, and a prefix failed on the mask's size)"
    ),
}
KNOWN_STATIC = {"mistral": STATIC_SLIDING}


def _llama_like(name: str, windowed: bool) -> Family:
    return Family(
        name=name,
        locator="llama-like",
        kind="decoder-only",
        padding="left",
        sites=("self",),
        build=lambda attn: tiny_llama_like(name, attn),
        make_batch=_batch("llama"),
        prompt_oracle=_inputs_embeds_oracle("llama"),
        prefix_oracle=_decoder_only_prefix,
        not_applicable={"padded[prefix]": SLIDING, "mixed[prefix]": SLIDING} if windowed else {},
        known_failures=KNOWN_STATIC.get(name, {}),
    )


def _causal(name: str, key: str) -> Family:
    return Family(
        name=name,
        locator="opt" if key.startswith("opt") else "gpt_neox",
        kind="decoder-only",
        padding="left",
        sites=("self",),
        build=lambda attn: tiny_causal(key, attn),
        make_batch=lambda lengths, seed: left_padded(lengths, seed),
        prompt_oracle=_causal_oracle(key.split("-")[0]),
        prefix_oracle=_decoder_only_prefix,
    )


def _encoder(name: str) -> Family:
    na = {"cache": ENCODER, "static": ENCODER, "peft[prompt]": PEFT_CLS}
    if name == "distilbert":
        na["peft[prefix]"] = "PEFT cannot load a DistilBERT prefix: its attention takes no cache"
    return Family(
        name=name,
        locator=name,
        kind="encoder",
        padding="right",
        sites=("self",),
        build=lambda attn: tiny_encoder(name, "lm", attn),
        make_batch=lambda lengths, seed: encoder_batch(name, lengths, seed),
        prompt_oracle=_encoder_oracle(name),
        prefix_oracle=_roberta_prefix if name == "roberta" else _distilbert_prefix,
        min_length=2,
        not_applicable=na,
    )


PLAIN = {
    "cache": "plain nn.MultiheadAttention keeps no key/value cache",
    "static": "plain nn.MultiheadAttention keeps no key/value cache",
    "peft": "PEFT wraps transformers models only",
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            name="gpt2",
            locator="gpt2",
            kind="decoder-only",
            padding="left",
            sites=("self",),
            build=lambda attn: models.tiny("gpt2", attn),
            make_batch=_batch("gpt2"),
            prompt_oracle=_inputs_embeds_oracle("gpt2"),
            prefix_oracle=_decoder_only_prefix,
        ),
        Family(
            name="llama",
            locator="llama",
            kind="decoder-only",
            padding="left",
            sites=("self",),
            build=lambda attn: models.tiny("llama", attn),
            make_batch=_batch("llama"),
            prompt_oracle=_inputs_embeds_oracle("llama"),
            prefix_oracle=_decoder_only_prefix,
        ),
        _llama_like("mistral", windowed=True),
        _llama_like("qwen2", windowed=True),
        _llama_like("qwen3", windowed=False),
        _llama_like("gemma", windowed=False),
        _llama_like("gemma3", windowed=True),
        _llama_like("phi3", windowed=False),
        _llama_like("granite", windowed=False),
        _causal("gpt_neox", "neox"),
        _causal("opt", "opt"),
        _causal("opt-proj", "opt-proj"),
        Family(
            name="bert",
            locator="bert",
            kind="encoder",
            padding="right",
            sites=("self",),
            build=lambda attn: models.tiny("bert", attn),
            make_batch=_batch("bert"),
            prompt_oracle=_inputs_embeds_oracle("bert"),
            prefix_oracle=_decoder_only_prefix,  # BERT's own past-key-values path
            min_length=2,
            not_applicable={"cache": ENCODER, "static": ENCODER, "peft[prompt]": PEFT_CLS},
        ),
        _encoder("roberta"),
        _encoder("distilbert"),
        Family(
            name="t5",
            locator="t5",
            kind="encoder-decoder",
            padding="right",
            sites=("enc_self", "dec_self", "cross"),
            build=lambda attn: models.tiny("t5", attn),
            make_batch=_batch("t5"),
            prompt_oracle=_inputs_embeds_oracle("t5"),
            prefix_oracle=_t5_prefix,
            shifts=(True,),  # relative positions: nothing to shift
            decoder=_decoder,
            not_applicable={
                "peft[prefix]": "PEFT's T5 prefix reaches decoder self-attention only",
            },
        ),
        Family(
            name="bart",
            locator="bart",
            kind="encoder-decoder",
            padding="right",
            sites=("enc_self", "dec_self", "cross"),
            build=lambda attn: tiny_bart(attn),
            make_batch=_batch("t5"),  # right padding, BART's convention
            prompt_oracle=_bart_oracle,
            prefix_oracle=_bart_prefix,
            decoder=_decoder,
            prompt_scale=3.0,  # several times the scaled token embeddings
            not_applicable={
                "peft[prefix]": (
                    "PEFT's prefix format holds one stack's layers: save_peft refuses "
                    "BART's encoder, decoder and cross sites (att.save keeps them)"
                ),
            },
        ),
        Family(
            name="torch-mha-lm",
            locator="torch-mha",
            kind="plain",
            padding="right",
            sites=("self",),
            build=lambda attn: PlainLM(batch_first=attn == "batch_first"),
            make_batch=plain_batch,
            prompt_oracle=_plain_prompt_oracle,
            prefix_oracle=_plain_prefix,
            attns=("seq_first", "batch_first"),  # layers run sequence-first inside, or not
            shifts=(True,),
            losses=False,
            atol=2e-5,
            not_applicable=PLAIN,
        ),
        Family(
            name="torch-mha-s2s",
            locator="torch-mha",
            kind="plain",
            padding="right",
            sites=("enc_self", "dec_self", "cross"),
            build=lambda attn: PlainSeq2Seq(batch_first=attn == "batch_first"),
            make_batch=plain_batch,
            prompt_oracle=_plain_prompt_oracle,
            prefix_oracle=_plain_prefix,
            attns=("seq_first", "batch_first"),  # layers run sequence-first inside, or not
            shifts=(True,),
            decoder=_plain_decoder,
            losses=False,
            atol=2e-5,
            not_applicable=PLAIN,
        ),
    ]
}


def cells(prop: str, per_method: bool = True) -> list[tuple[str, str]]:
    """(family, method) pairs where ``prop`` applies: the cells to collect."""
    out = []
    for name, family in FAMILIES.items():
        for method in METHODS if per_method else ("both",):
            if family.reason(prop, None if method == "both" else method) is None:
                out.append((name, method))
    return out
