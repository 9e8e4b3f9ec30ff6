from __future__ import annotations

import json

from orchestrator.agent import (
    Answer,
    Failure,
    Init,
    Result,
    Text,
    ToolUse,
    Transcript,
    Unparsed,
    outcome,
    parse_line,
    turn_argv,
)
from orchestrator.config import AgentSettings

SESSION = "e9e352d1-0000-4000-8000-000000000001"
INIT = {"type": "system", "subtype": "init", "cwd": "/workspace", "session_id": SESSION, "model": "claude-x"}
TOOL = {"type": "assistant", "session_id": SESSION, "message": {"id": "m1", "content": [
    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "echo hi"}}]}}
TEXT = {"type": "assistant", "session_id": SESSION, "message": {"id": "m2", "content": [
    {"type": "text", "text": "Done: the answer is 4."}]}}
SUCCESS = {"type": "result", "subtype": "success", "is_error": False, "num_turns": 2,
           "result": "Done: the answer is 4.", "session_id": SESSION, "total_cost_usd": 0.00108, "duration_ms": 276}


def transcript_of(*objects: object) -> Transcript:
    transcript = Transcript()
    for obj in objects:
        for event in parse_line(obj if isinstance(obj, str) else json.dumps(obj)):
            transcript.add(event)
    return transcript


def test_argv_of_a_fresh_and_a_resumed_turn() -> None:
    agent = AgentSettings(permission_mode="acceptEdits", model="sonnet", extra_args=("--max-turns", "5"))
    assert turn_argv(agent, None) == ["claude", "-p", "--output-format", "stream-json", "--verbose",
                                      "--permission-mode", "acceptEdits", "--model", "sonnet", "--max-turns", "5"]
    assert turn_argv(agent, SESSION)[-1] == f"--resume={SESSION}"


def test_the_prompt_is_never_in_the_argv() -> None:
    # The prompt is stdin data; nothing a user types can become a flag.
    argv = turn_argv(AgentSettings(), SESSION)
    assert argv.count("-p") == 1 and all(not arg.startswith("--resume=-") for arg in argv)


def test_parse_the_documented_stream() -> None:
    assert parse_line(json.dumps(INIT)) == [Init(session_id=SESSION, model="claude-x")]
    assert parse_line(json.dumps(TOOL)) == [ToolUse(name="Bash", input={"command": "echo hi"})]
    assert parse_line(json.dumps(TEXT)) == [Text("Done: the answer is 4.")]
    [result] = parse_line(json.dumps(SUCCESS))
    assert result == Result(is_error=False, subtype="success", text="Done: the answer is 4.", session_id=SESSION,
                            cost_usd=0.00108, duration_ms=276, num_turns=2)


def test_lines_that_carry_nothing_or_are_not_json() -> None:
    assert parse_line("") == []
    assert parse_line('{"type":"user","message":{"content":[]}}') == []
    assert parse_line('{"type":"system","subtype":"api_retry","attempt":1}') == []
    assert parse_line("Warning: something odd") == [Unparsed("Warning: something odd")]
    assert parse_line("[1, 2]") == [Unparsed("[1, 2]")]
    assert parse_line('{"type":"assis') == [Unparsed('{"type":"assis')]


def test_successful_turn() -> None:
    transcript = transcript_of(INIT, TOOL, TEXT, SUCCESS)
    assert transcript.tools_used == 1
    assert outcome(transcript, 0, "") == Answer("Done: the answer is 4.", SESSION, 0.00108, 276)


def test_result_without_text_falls_back_to_the_streamed_text() -> None:
    transcript = transcript_of(INIT, TEXT, {**SUCCESS, "result": ""})
    assert outcome(transcript, 0, "").text == "Done: the answer is 4."


def test_unknown_session() -> None:
    error = {"type": "result", "subtype": "error_during_execution", "is_error": True,
             "errors": [f"No conversation found with session ID: {SESSION}"], "session_id": "x"}
    result = outcome(transcript_of(error), 1, f"No conversation found with session ID: {SESSION}\n")
    assert isinstance(result, Failure) and result.unknown_session


def test_error_result_is_a_failure_with_the_cli_reason() -> None:
    error = {"type": "result", "subtype": "error_max_turns", "is_error": True, "errors": ["max turns reached"]}
    result = outcome(transcript_of(INIT, TEXT, error), 1, "")
    assert result == Failure("Claude Code reported an error: max turns reached",
                             partial_text="Done: the answer is 4.")


def test_cli_that_exits_without_a_result() -> None:
    result = outcome(transcript_of(INIT, TEXT), 137, "some warning\nKilled\n")
    assert isinstance(result, Failure) and not result.unknown_session
    assert result.reason == "Claude Code stopped without an answer (exit code 137)."
    assert result.detail == "Killed"  # stderr is the operator's, in the log: the chat does not see it
    assert result.partial_text == "Done: the answer is 4."
    assert "no output" in outcome(Transcript(), 1, "").reason
