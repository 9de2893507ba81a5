"""What one ranking request knows, shared by training, evaluation and serving."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Context:
    """A ranking request's context: a search query, a user with their history, or both.

    `history` holds the user's product ids known at request time, oldest first; a signal that needs
    "most recent first" reverses it. A user with an empty history is a cold-start user.
    """

    query: str | None = None
    user_id: str | None = None
    history: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """A stable identifier of the request, used as the query id in run files."""
        if self.query is not None and self.user_id is not None:
            return f"{self.user_id}|{self.query}"
        return self.query if self.query is not None else str(self.user_id)


@dataclass
class RankingExample:
    """One judged request: its context, the candidates to rank, and the graded gain of each candidate.

    Candidates missing from `gains` count as non-relevant (gain 0).
    """

    context: Context
    candidates: list[str]
    gains: dict[str, float] = field(default_factory=dict)

    @property
    def qid(self) -> str:
        return self.context.key
