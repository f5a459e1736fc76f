"""Approximation layer: polynomial approximants of exp and the feature maps that factor them."""

from .features import MonomialTables, feature_map, monomial_tables, query_weights, rank_for
from .polynomials import APPROXIMANTS, Approximant, Chebyshev, Taylor, get_approximant, output_error

__all__ = [
    "APPROXIMANTS",
    "Approximant",
    "Chebyshev",
    "MonomialTables",
    "Taylor",
    "feature_map",
    "get_approximant",
    "monomial_tables",
    "output_error",
    "query_weights",
    "rank_for",
]
