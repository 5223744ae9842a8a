"""What prompthooks needs to know about transformers' key/value caches.

Encoder-decoder caches hold a self-attention and a cross-attention cache;
fixed-size (static) caches allocate ``max_cache_len`` slots per layer on their
first update, sized by ``generate`` for the user's tokens only, so prompts
that add positions must enlarge them before that first update.
"""

from __future__ import annotations

from typing import Any


def layer_cache(cache: Any, role: str) -> Any:
    """The part of a (possibly encoder-decoder) cache that one attention role updates."""
    if role == "cross":
        return getattr(cache, "cross_attention_cache", None)
    return getattr(cache, "self_attention_cache", cache)


def make_room(cache: Any, layer: int, count: int) -> bool:
    """A fixed-size cache layer gets ``count`` more slots, which ``generate`` did
    not plan for. Possible only before the layer allocates; growing caches are
    left alone. Returns whether the layer is a fixed-size one.

    A sliding-window layer holds ``min(window, planned length)`` slots; the P
    more tokens may need up to P more. Slots beyond the window only keep keys
    that the model's mask, built with the window (``masks.padding_mask``), hides.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or layer >= len(layers) or not hasattr(layers[layer], "max_cache_len"):
        return False
    target = layers[layer]
    if getattr(target, "is_initialized", False):
        if (recall(cache, "room") or 0) >= count:
            return True  # a cache reused from an earlier call got its slots then
        raise ValueError(
            f"{type(cache).__name__} layer {layer} is already allocated "
            f"({target.max_cache_len} slots), so it has no room for the prompt's {count} "
            "tokens; let generate() create the cache, or allocate it after attaching"
        )
    target.max_cache_len += count
    if layer == len(layers) - 1:  # every layer has its slots now (soft prompt and prefix add up)
        remember(cache, "room", (recall(cache, "room") or 0) + count)
    return True


def make_room_everywhere(cache: Any, count: int) -> None:
    """``make_room`` on every layer of a decoder cache (none: nothing to do)."""
    if cache is None:
        return
    target = layer_cache(cache, "self")
    for layer in range(len(getattr(target, "layers", ()))):
        make_room(target, layer, count)


#: Attribute under which a cache carries what prompthooks put into it. On the
#: cache, not on the hooks: it goes wherever the cache goes (a deep copy of a
#: prompt cache, another thread) and is freed with it.
_RECORD = "_prompthooks"


def remember(cache: Any, what: str, value: Any) -> None:
    """Note on ``cache`` what a call put into it (``"inserted"``: virtual tokens
    in the sequence; ``"prefix"``: the prefix layout at its front; ``"room"``:
    the slots added to a fixed-size cache)."""
    record = cache.__dict__.setdefault(_RECORD, {})
    record[what] = value


def recall(cache: Any, what: str) -> Any:
    """What ``remember`` noted on ``cache`` (``None``: nothing, or no cache)."""
    if cache is None:
        return None
    return getattr(cache, "__dict__", {}).get(_RECORD, {}).get(what)


def prefix_width(cache: Any) -> int:
    """Prefix slots ``cache`` holds in front of the tokens (0 if none)."""
    rows = recall(cache, "prefix")
    return int(rows.width) if rows is not None else 0
