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


# Every move the life of a message allows, each with why; every other pair of states is refused.
ALLOWED = {
    (State.RECEIVED, State.QUEUED),  # its turn is coming
    (State.RECEIVED, State.FAILED),  # refused before it ran (a file it brought could not be had, a shutdown)
    (State.RECEIVED, State.MERGED),  # files only: a later message of its sender took them
    (State.QUEUED, State.RUNNING),
    (State.QUEUED, State.FAILED),  # failed while it waited (a shutdown, a container that cannot start)
    (State.RUNNING, State.ANSWERED),
    (State.RUNNING, State.FAILED),  # the turn crashed, hung or was interrupted
    (State.RUNNING, State.QUEUED),  # handed back to run again with a fresh session
    (State.ANSWERED, State.DELIVERED),
    (State.ANSWERED, State.FAILED),  # the answer proved undeliverable for good
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(State, State)))
def test_exactly_the_allowed_moves_are_allowed(current: State, target: State) -> None:
    allowed = (current, target) in ALLOWED
    assert (target in TRANSITIONS[current]) == allowed
    assert (current in predecessors(target)) == allowed


def test_every_unfinished_state_can_fail_and_no_final_state_can_move() -> None:
    assert all(State.FAILED in TRANSITIONS[state] for state in UNFINISHED)
    assert all(TRANSITIONS[state] == frozenset() for state in FINAL)
    assert predecessors(State.FAILED) == UNFINISHED
    assert predecessors(State.RECEIVED) == frozenset()  # nothing goes back to the start
