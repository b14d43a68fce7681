"""Moving through a review session: which item comes next under a decision filter."""

from __future__ import annotations

from fetalstudio.review.store import DECISIONS, ReviewSession

ALL = "all"
FILTERS = (ALL, *DECISIONS)


def filtered_ids(session: ReviewSession, decision_filter: str | None) -> list[str]:
    """Item ids under a filter ("all" or one decision), in id order."""
    decision = None if decision_filter in (None, "", ALL) else decision_filter
    if decision is not None and decision not in DECISIONS:
        raise ValueError(f"Unknown filter {decision_filter!r}: use one of {', '.join(FILTERS)}.")
    return [item.id for item in session.items(decision)]


def neighbour(session: ReviewSession, item_id: str | None, decision_filter: str | None, step: int) -> str | None:
    """The item ``step`` places after (or before, step < 0) ``item_id`` under the filter.

    The current item may have left the filter (e.g. just accepted while showing "pending"): the
    neighbour is then found by id order. At either end the last reachable item is kept; an empty
    filter gives None.
    """
    ids = filtered_ids(session, decision_filter)
    if not ids:
        return None
    if item_id is None:
        return ids[0] if step >= 0 else ids[-1]
    if item_id in ids:
        position = ids.index(item_id) + step
    else:  # the ids after item_id start at the insertion point
        after = sum(1 for i in ids if i < item_id)
        position = after + step - (1 if step > 0 else 0)
    return ids[min(max(position, 0), len(ids) - 1)]


def position_of(session: ReviewSession, item_id: str | None, decision_filter: str | None) -> tuple[int, int]:
    """(1-based position of the item under the filter, or 0 when it is not in it; filter size)."""
    ids = filtered_ids(session, decision_filter)
    return (ids.index(item_id) + 1 if item_id in ids else 0), len(ids)
