"""Checks that a hook's contribution reached the module it was handed to.

A hook-based library lives on the call conventions of the modules it hooks.
When those change (a renamed argument, a module that no longer asks its cache
for keys), a hook's contribution can be silently dropped and the model would
compute without the prompt. Two lines of defence:

* at attach: every attention site must take the cache and mask arguments the
  locator named, as parameters of its own forward (not swallowed by
  ``**kwargs``); otherwise attaching is refused;
* on every call: what the hooks handed over must have been used (the cache
  stand-in asked for its keys, every site reached, the splice run by the
  embedding); otherwise the call raises ``PromptNotAppliedError`` instead of
  returning outputs computed without the prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..locators.base import AttentionSite, Located
from ..locators.conventions import PromptNotAppliedError, library_versions, named_parameters
from ..locators.registry import UnsupportedModelError
from .arguments import cache_length

if TYPE_CHECKING:
    from ..locators.base import Role
    from .prefix import PrefixCall


def module_name(located: Located, module: nn.Module) -> str:
    """``LlamaAttention (model.layers.0.self_attn)``: what an error names."""
    path = next((n for n, m in located.model.named_modules() if m is module), None)
    where = f" ({path or '<model>'})" if path is not None else ""
    return f"{type(module).__name__}{where}"


def not_applied(
    located: Located, module: nn.Module, what: str, expected: str
) -> PromptNotAppliedError:
    """The error a call raises when ``module`` did not use what a hook gave it."""
    return PromptNotAppliedError(
        f"prompthooks: {what} in {module_name(located, module)} ({library_versions()}). "
        f"prompthooks expected {expected}. The outputs would have been computed without "
        "the prompt, so the call was stopped. The model's call conventions differ from "
        "what prompthooks read: use a transformers release in the supported range (README, "
        "'Supported versions'), or fix the locator's AttentionSite names."
    )


def check_sites_take_their_names(located: Located) -> None:
    """Refuse (before anything changes) sites whose forward does not take the
    cache and mask arguments the prefix hooks would hand it."""
    for site in located.sites:
        if site.prefix_in == "inputs":
            continue  # nn.MultiheadAttention: torch's own argument names
        wanted = [("mask", site.mask_arg)]
        if site.prefix_in == "cache":
            wanted.insert(0, ("cache", site.cache_arg))
        takes = named_parameters(site.module)
        for what, name in wanted:
            if name is None or name not in takes:
                raise UnsupportedModelError(_site_message(located, site, what, name, takes))


def _site_message(
    located: Located, site: AttentionSite, what: str, name: str | None, takes: tuple[str, ...]
) -> str:
    forward = f"{type(site.module).__name__}.forward"
    given = (
        f"found no {what} argument"
        if name is None
        else f"was told to pass the {what} as {name!r}, which it does not take"
    )
    return (
        f"cannot attach a prefix to {module_name(located, site.module)}: prompthooks {given} "
        f"(it takes {', '.join(takes) or 'nothing it names'}; {library_versions()}). "
        f"A prefix handed to {forward} under another name would be ignored. Use a "
        "transformers release in the supported range (README, 'Supported versions'), or "
        f"give the locator's AttentionSite the right {what}_arg."
    )


def check_prefix_applied(
    located: Located, call: PrefixCall, stack: nn.Module, roles: frozenset[Role]
) -> None:
    """After a stack ran: every site of ``roles`` used the prefix it was handed
    (proxy mode), or the filled cache grew by the stack's tokens (cache mode)."""
    filled = call.filled.pop(roles, None)
    if filled is not None:
        cache, before = filled
        if cache_length(cache) <= before:
            raise not_applied(
                located,
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
    for index, site in enumerate(located.sites):
        if site.role not in roles or site.prefix_in != "cache":
            continue
        handed = call.handed.pop(index, None)
        if handed is None and skips_layers:
            continue
        if handed is None:
            raise not_applied(
                located,
                site.module,
                "the prefix never reached this attention site (its pre-hook did not run)",
                f"{type(stack).__name__} to call every attention module it located",
            )
        if not handed.used:
            raise not_applied(
                located,
                site.module,
                f"the prefix handed over as {site.cache_arg!r} was never asked for its keys",
                f"{type(site.module).__name__}.forward to take its key/value cache as "
                f"{site.cache_arg!r} and call its update()",
            )
