from orchestrator.housekeeping import Candidate, Finding, Reconciled, containers_to_stop, reconcile
from orchestrator.runtime import ContainerState
from orchestrator.store import ChatRecord


def chat(chat_id: str, container: str = "") -> ChatRecord:
    return ChatRecord(chat_id, "", container, "", None, None)


def container(name: str, chat_id: str, status: str = "running") -> ContainerState:
    return ContainerState(name=name, id=f"id-{name}", status=status, chat_id=chat_id)


def test_reconcile_both_ways() -> None:
    chats = [chat("a", "o-a"), chat("b", "o-b"), chat("c", "o-c"), chat("new")]
    containers = [container("o-a", "a"), container("o-b", "b", "exited"), container("o-x", "x")]
    assert reconcile(chats, containers) == [
        Reconciled("a", Finding.RUNNING, containers[0]),
        Reconciled("b", Finding.STOPPED, containers[1]),
        Reconciled("c", Finding.VANISHED, None),
        Reconciled("x", Finding.UNKNOWN, containers[2]),
    ]


def test_idle_containers_stop_after_the_idle_time() -> None:
    running = [Candidate("a", "o-a", 100.0), Candidate("b", "o-b", 900.0), Candidate("c", "o-c", 0.0)]
    assert [c.chat_id for c in containers_to_stop(running, busy={"c"}, now=1000.0, idle_stop=500, max_running=0)] \
        == ["a"]


def test_max_running_stops_the_least_recently_used_idle_ones() -> None:
    running = [Candidate(x, f"o-{x}", t) for x, t in (("a", 300.0), ("b", 100.0), ("c", 200.0), ("d", 50.0))]
    stop = containers_to_stop(running, busy={"d"}, now=400.0, idle_stop=10_000, max_running=2)
    assert [c.chat_id for c in stop] == ["b", "c"]  # d is busy, so the two oldest idle ones go
    assert containers_to_stop(running, busy=set(), now=400.0, idle_stop=10_000, max_running=4) == []


def test_a_chat_that_never_had_a_container_does_not_hide_the_next_ones() -> None:
    chats = [chat("new"), chat("a", "o-a")]
    assert reconcile(chats, []) == [Reconciled("a", Finding.VANISHED, None)]


def test_a_container_idle_exactly_the_idle_time_stops() -> None:
    running = [Candidate("a", "o-a", 500.0), Candidate("b", "o-b", 501.0)]
    assert [c.chat_id for c in containers_to_stop(running, busy=set(), now=1000.0, idle_stop=500, max_running=0)] \
        == ["a"]


def test_max_running_counts_the_idle_ones_already_stopping() -> None:
    running = [Candidate(x, f"o-{x}", t) for x, t in (("a", 0.0), ("b", 900.0), ("c", 950.0), ("d", 990.0))]
    stop = containers_to_stop(running, busy=set(), now=1000.0, idle_stop=500, max_running=2)
    assert [c.chat_id for c in stop] == ["a", "b"]  # a is idle past the time; of the three left, one more must go
    stop = containers_to_stop(running[:3], busy=set(), now=1000.0, idle_stop=500, max_running=2)
    assert [c.chat_id for c in stop] == ["a"]  # a's stop alone brings it to two
