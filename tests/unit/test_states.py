import itertools

import pytest

from orchestrator.states import FINAL, TRANSITIONS, UNANSWERED, UNFINISHED, State, predecessors


def test_the_happy_path_is_allowed() -> None:
    path = [State.RECEIVED, State.QUEUED, State.RUNNING, State.ANSWERED, State.DELIVERED]
    for current, target in itertools.pairwise(path):
        assert target in TRANSITIONS[current]


@pytest.mark.parametrize(("current", "target"), [
    (State.DELIVERED, State.RUNNING),
    (State.FAILED, State.QUEUED),
    (State.ANSWERED, State.QUEUED),  # an answer is kept for delivery, never run a second time
    (State.RECEIVED, State.RUNNING),
    (State.QUEUED, State.ANSWERED),
    (State.QUEUED, State.MERGED),  # only files still waiting for their text are merged, never a message on its way
    (State.MERGED, State.QUEUED),  # its files are answered with the message that took them, never again alone
])
def test_transitions_that_would_lose_or_repeat_work_are_refused(current: State, target: State) -> None:
    assert target not in TRANSITIONS[current]
    assert current not in predecessors(target)


def test_final_and_unfinished_states() -> None:
    assert frozenset({State.DELIVERED, State.FAILED, State.MERGED}) == FINAL
    assert State.ANSWERED in UNFINISHED and State.RUNNING in UNFINISHED
    assert frozenset({State.RECEIVED, State.QUEUED, State.RUNNING}) == UNANSWERED


def test_predecessors() -> None:
    assert predecessors(State.QUEUED) == {State.RECEIVED, State.RUNNING}
    assert predecessors(State.DELIVERED) == {State.ANSWERED}
    assert predecessors(State.MERGED) == {State.RECEIVED}
