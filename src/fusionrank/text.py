"""The texts a cross-encoder reads: the context (a query, or a user's recent purchases) and the product.

Pure Python on purpose: training, evaluation and serving build their texts here, so that all three feed the
model the same strings (no train/serve skew), and the module imports anywhere without heavy dependencies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fusionrank.context import Context

# Between titles of the history, and between a query and a history. Not "[SEP]": the tokenizer would read it
# as the special token that separates the two segments of a pair, and blur where the context ends.
SEPARATOR = " | "
DEFAULT_MAX_TITLES = 10


def clean_text(text: str) -> str:
    """`text` with runs of whitespace (tabs, newlines, repeated spaces) collapsed to one space, trimmed."""
    return " ".join(text.split())


def query_text(query: str) -> str:
    """The context text of a search request."""
    return clean_text(query)


def history_text(
    history: Sequence[str],
    titles: Mapping[str, str],
    max_titles: int = DEFAULT_MAX_TITLES,
    separator: str = SEPARATOR,
) -> str:
    """The context text of a recommendation request: the titles of the user's most recent products.

    `history` holds product ids oldest first (as in `Context.history`). The text lists titles NEWEST first,
    so that when a tokenizer truncates a long history it drops the oldest purchases. At most `max_titles`
    titles are kept; ids without a title in `titles` are skipped, and a product bought more than once appears
    once, at its most recent place. An empty history gives "".
    """
    if max_titles < 1:
        raise ValueError(f"max_titles must be at least 1, got {max_titles}")
    picked: list[str] = []
    seen: set[str] = set()
    for product_id in reversed(history):
        title = titles.get(product_id)
        if title is None or product_id in seen:
            continue
        seen.add(product_id)
        picked.append(clean_text(title))
        if len(picked) == max_titles:
            break
    return separator.join(picked)


def context_text(
    context: Context,
    titles: Mapping[str, str],
    max_titles: int = DEFAULT_MAX_TITLES,
    separator: str = SEPARATOR,
) -> str:
    """The context text of any request: the query, the history, or the query then the history."""
    parts = []
    if context.query is not None:
        parts.append(query_text(context.query))
    if context.history:
        history = history_text(context.history, titles, max_titles, separator)
        if history:
            parts.append(history)
    return separator.join(parts)


def product_text(title: str, brand: str | None = None, category: str | None = None) -> str:
    """The product side of a pair: the title, then brand and category when known and not already in it."""
    text = clean_text(title)
    extras = [clean_text(value) for value in (brand, category) if value]
    extras = [extra for extra in extras if extra and extra.lower() not in text.lower()]
    return f"{text} ({', '.join(extras)})" if extras else text
