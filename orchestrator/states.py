"""A message's life: received → queued → running → answered → delivered, or failed with a reason; or received →
merged: a message of files only, whose files a later message of the same sender took (they are answered with it).

Pure: the store applies these rules with conditional updates, so a transition happens at most once.
"""

from enum import StrEnum


class State(StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    ANSWERED = "answered"
    DELIVERED = "delivered"
    FAILED = "failed"
    MERGED = "merged"


# Each state and the states a message may move to from it.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.RECEIVED: frozenset({State.QUEUED, State.FAILED, State.MERGED}),
    State.QUEUED: frozenset({State.RUNNING, State.FAILED}),
    # running → queued: a turn handed back to the queue (a fresh session after an unknown one).
    State.RUNNING: frozenset({State.ANSWERED, State.FAILED, State.QUEUED}),
    # answered → failed: only when the answer proved undeliverable for good.
    State.ANSWERED: frozenset({State.DELIVERED, State.FAILED}),
    State.DELIVERED: frozenset(),
    State.FAILED: frozenset(),
    State.MERGED: frozenset(),  # never answered on its own, nor told anything
}

FINAL = frozenset(state for state, following in TRANSITIONS.items() if not following)
UNFINISHED = frozenset(State) - FINAL
UNANSWERED = UNFINISHED - {State.ANSWERED}  # waiting for its turn or in it: failing it takes nothing back


def predecessors(target: State) -> frozenset[State]:
    """The states from which a message may move to `target`."""
    return frozenset(state for state, following in TRANSITIONS.items() if target in following)
