"""Traditional ranking signals: BM25, popularity and item-item collaborative filtering."""

from fusionrank.signals.base import FallbackRetriever, Retriever, Signal, load_signal
from fusionrank.signals.bm25 import BM25Signal
from fusionrank.signals.cf import EASESignal, ItemKNNSignal
from fusionrank.signals.popularity import PopularitySignal

__all__ = [
    "BM25Signal",
    "EASESignal",
    "FallbackRetriever",
    "ItemKNNSignal",
    "PopularitySignal",
    "Retriever",
    "Signal",
    "load_signal",
]
