"""The hot operations, behind one dispatch point each."""

from .splice import splice_tokens

__all__ = ["splice_tokens"]
