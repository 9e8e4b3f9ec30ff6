from __future__ import annotations

import json
from pathlib import Path

from orchestrator.agent import (
    CHAT_PROMPT,
    Answer,
    Failure,
    Init,
    Result,
    Text,
    ToolUse,
    Transcript,
    Unparsed,
    cli_argv,
    outcome,
    parse_line,
)
from orchestrator.agent_host import decode_request, encode_request
from orchestrator.config import AgentSettings, ChatOptions
from tests.unit.test_agent_host import FAKE_CLI, Channel

SESSION = "e9e352d1-0000-4000-8000-000000000001"
TURN = "3-1-6dbb76282f5ff219"
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


def test_argv_of_the_long_lived_cli() -> None:
    agent = AgentSettings(model="sonnet", extra_args=("--max-turns", "5"))
    assert cli_argv(agent, ChatOptions()) == [
        "claude", "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
        "--permission-mode", "bypassPermissions", "--append-system-prompt", CHAT_PROMPT, "--model", "sonnet",
        "--max-turns", "5"]
    assert "/workspace/outbox/" in CHAT_PROMPT and "send-file" in CHAT_PROMPT  # Claude is told how to send files


def test_a_chat_that_asks_for_approvals_gets_the_prompts_on_stdio_and_its_auto_allow_rules() -> None:
    chat = ChatOptions(permission_mode="default", auto_allow=("Read", "Bash(git status:*)"))
    argv = cli_argv(AgentSettings(), chat)
    assert argv[argv.index("--permission-mode") + 1] == "default"
    assert argv[argv.index("--permission-prompt-tool") + 1] == "stdio"
    assert argv[argv.index("--setting-sources") + 1] == ""  # no permission rules from files the agent can write
    assert [a for a in argv if a.startswith("--allowedTools")] == ["--allowedTools=Read",
                                                                   "--allowedTools=Bash(git status:*)"]
    # bypassPermissions asks nothing: the rules would mean nothing, and no prompt tool is given
    assert "--permission-prompt-tool" not in cli_argv(AgentSettings(), ChatOptions(auto_allow=("Read",)))


# A prompt that would do harm as argv: a flag, a session to resume, shell.
MARKER = "prompt-7f3a"
HOSTILE_PROMPT = f"--dangerously-skip-permissions --resume={SESSION} {MARKER} $(touch /tmp/{MARKER})\n--model=evil"


def test_the_prompt_goes_in_the_stdin_message_of_the_request_and_never_in_its_argv() -> None:
    """The request the orchestrator writes for a turn, as the agent host reads it: its argv is the CLI's and nothing
    more; the prompt is the user message the host writes to the CLI's stdin."""
    agent, chat = AgentSettings(model="sonnet", extra_args=("--max-turns", "5")), ChatOptions(permission_mode="default")
    request = decode_request(encode_request(cli_argv(agent, chat), {}, SESSION, HOSTILE_PROMPT, 60.0))
    assert list(request.argv) == cli_argv(agent, chat)
    assert not any(MARKER in arg or "--model=evil" in arg or arg == "--dangerously-skip-permissions"
                   for arg in request.argv)
    assert request.message == {"type": "user", "message": {"role": "user", "content": HOSTILE_PROMPT}}


def test_the_cli_the_agent_host_starts_gets_the_prompt_on_stdin_and_not_in_its_argv(tmp_path: Path) -> None:
    """The whole way: the orchestrator's argv (with the fake CLI in place of `claude`) and a hostile prompt, served
    by the agent host; the running CLI's own command line holds none of the prompt, and it answered the prompt."""
    argv = cli_argv(AgentSettings(), ChatOptions())
    host = Channel(tmp_path / "chat").start()
    try:
        turn = host.ask(HOSTILE_PROMPT, argv=(*FAKE_CLI[:2], *argv[1:]))
        command_line = Path(f"/proc/{turn.pid}/cmdline").read_bytes().split(b"\0")
    finally:
        host.stop()
    assert turn.answer == f"Fake answer to: {HOSTILE_PROMPT}"
    assert [arg.decode() for arg in command_line if arg] == [*FAKE_CLI[:2], *argv[1:]]


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
    assert outcome(TURN, transcript, 0, "") == Answer("Done: the answer is 4.", SESSION, 0.00108, 276, turn=TURN)


def test_result_without_text_falls_back_to_the_streamed_text() -> None:
    transcript = transcript_of(INIT, TEXT, {**SUCCESS, "result": ""})
    assert outcome(TURN, transcript, 0, "").text == "Done: the answer is 4."


def test_unknown_session() -> None:
    error = {"type": "result", "subtype": "error_during_execution", "is_error": True,
             "errors": [f"No conversation found with session ID: {SESSION}"], "session_id": "x"}
    result = outcome(TURN, transcript_of(error), 1, f"No conversation found with session ID: {SESSION}\n")
    assert isinstance(result, Failure) and result.unknown_session


def test_error_result_is_a_failure_with_the_cli_reason() -> None:
    error = {"type": "result", "subtype": "error_max_turns", "is_error": True, "errors": ["max turns reached"]}
    result = outcome(TURN, transcript_of(INIT, TEXT, error), 1, "")
    assert result == Failure("Claude Code reported an error: max turns reached",
                             partial_text="Done: the answer is 4.")


def test_cli_that_exits_without_a_result() -> None:
    result = outcome(TURN, transcript_of(INIT, TEXT), 137, "some warning\nKilled\n")
    assert isinstance(result, Failure) and not result.unknown_session
    assert result.reason.startswith("Claude Code stopped in the middle of this answer (exit code 137).")
    assert result.detail == "Killed"  # stderr is the operator's, in the log: the chat does not see it
    assert result.partial_text == "Done: the answer is 4."
    silent = outcome(TURN, Transcript(), 1, "")
    assert isinstance(silent, Failure) and silent.detail == "no output"


def texts(*parts: str, answer_bytes: int) -> Transcript:
    transcript = Transcript(answer_bytes=answer_bytes)
    for part in parts:
        transcript.add(Text(part))
    return transcript


def test_answer_text_is_kept_up_to_the_cap_in_utf8_bytes() -> None:
    exact = texts("a" * 10, answer_bytes=10)
    assert exact.text_so_far == "a" * 10 and not exact.truncated
    cut = texts("你好世界", answer_bytes=7)  # 3 bytes each: two fit, the third would be split
    assert cut.truncated and cut.texts == ["你好"]
    assert cut.text_so_far == "你好\n\n(The answer was cut here: it was longer than 7 bytes.)"
    big = texts("x" * 3_000_000, answer_bytes=1_000_000)
    assert big.texts == ["x" * 1_000_000]
    assert "longer than 1,000,000 bytes" in big.text_so_far


def test_the_cap_holds_over_many_texts_and_nothing_follows_the_cut() -> None:
    many = texts(*["ab"] * 1000, answer_bytes=20)
    kept = many.text_so_far.split("\n\n(The answer was cut here")[0]
    assert many.truncated and len(kept.encode()) <= 20
    after = texts("x" * 8, "é" * 5, "y", answer_bytes=10)  # "é" does not fit; "y" would, but comes after the cut
    assert after.texts == ["x" * 8] and after.truncated


def test_the_cut_answer_is_the_answer_with_its_note() -> None:
    transcript = Transcript(answer_bytes=1024)
    for event in [*parse_line(json.dumps(INIT)), Text("z" * 5000), *parse_line(json.dumps(SUCCESS))]:
        transcript.add(event)
    answer = outcome(TURN, transcript, 0, "")
    assert isinstance(answer, Answer)
    assert answer.text.startswith("z" * 1024 + "\n\n(The answer was cut here")
    assert "Done: the answer is 4." not in answer.text


def test_failure_detail_holds_the_last_stderr_line_and_the_reason_does_not() -> None:
    stderr = "FEISHU_APP_SECRET=s3cr3t\nTypeError: boom at /app/cli.js:1\n\n"
    failure = outcome(TURN, transcript_of(INIT), 1, stderr)
    assert isinstance(failure, Failure)
    assert failure.detail == "TypeError: boom at /app/cli.js:1"
    assert "boom" not in failure.reason and "s3cr3t" not in failure.reason
    assert len(outcome(TURN, transcript_of(INIT), 1, "y" * 10_000).detail) <= 300


def test_the_clis_error_text_is_shown_bounded() -> None:
    from orchestrator.agent import ERROR_SHOWN

    long_error = json.dumps({"type": "result", "subtype": "error_during_execution", "is_error": True,
                             "errors": ["E" * 100_000]})
    result = outcome(TURN, transcript_of(INIT, long_error), 1, "")
    assert isinstance(result, Failure)
    assert result.reason.startswith("Claude Code reported an error: EEE")
    assert len(result.reason) <= ERROR_SHOWN + 40


def test_a_session_id_that_is_not_a_uuid_is_ignored() -> None:
    """The output is the agent's to write: a forged id would be stored and passed to --resume= later."""
    for forged in ("a", "x" * 1_000_000, "--dangerously-skip-permissions", 42, None, SESSION.upper() + "0"):
        [init] = parse_line(json.dumps({**INIT, "session_id": forged}))
        assert isinstance(init, Init) and init.session_id == ""
    [init] = parse_line(json.dumps(INIT))
    assert init.session_id == SESSION


def test_forged_numbers_in_a_result_are_not_believed() -> None:
    """The result line is the agent's to forge: what it cannot have meant must not reach the store or status."""
    for cost in (float("inf"), 1e300, -1.0, "0.5", True, None):
        for duration in ("abc", 1e300, -5, 1.5, {"a": 1}, False):
            line = json.dumps({**SUCCESS, "total_cost_usd": cost, "duration_ms": duration, "num_turns": "x"})
            [result] = parse_line(line.replace('"Infinity"', "Infinity"))
            assert result.cost_usd is None and result.duration_ms is None and result.num_turns is None
    [fine] = parse_line(json.dumps({**SUCCESS, "total_cost_usd": 2, "duration_ms": 276.0}))
    assert fine.cost_usd == 2.0 and isinstance(fine.cost_usd, float) and fine.duration_ms == 276


def test_assistant_lines_of_the_wrong_shape_or_nested_thousands_deep_are_skipped() -> None:
    deep = '{"type":"assistant","message":{"content":[{"type":"tool_use","input":' + "[" * 5000 + "]" * 5000 + "}]}}"
    assert parse_line(deep) == [Unparsed(deep)]
    for message in ("x", {"content": "text"}, {"content": ["x", 1, None]}, {"content": [{"type": "text", "text": 5}]}):
        assert parse_line(json.dumps({"type": "assistant", "message": message})) == []
    [tool] = parse_line(json.dumps({"type": "assistant", "message": {"content": [
        {"type": "tool_use", "name": "Bash", "input": "not a dict"}]}}))
    assert tool == ToolUse(name="Bash", input={})


def test_a_lone_surrogate_in_the_text_cannot_break_the_answer() -> None:
    # "\ud800" is a valid JSON escape but no UTF-8: kept, it failed the answer's store write and every send.
    transcript = transcript_of('{"type":"assistant","message":{"content":[{"type":"text","text":"a\\ud800b"}]}}')
    assert transcript.text_so_far.encode() == b"a?b"


# ---- the edges of the stream's fields, and the words the user is shown ----


def test_a_block_of_the_wrong_shape_skips_only_itself() -> None:
    line = json.dumps({"type": "assistant", "message": {"content": [
        "x", 1, {"type": "text", "text": "after"}, {"type": "tool_use", "input": {"a": 1}}]}})
    assert parse_line(line) == [Text("after"), ToolUse(name="", input={"a": 1})]  # a tool use without a name


def test_an_init_or_result_line_without_its_optional_fields() -> None:
    assert parse_line(json.dumps({"type": "system", "subtype": "init"})) == [Init(session_id="", model="")]
    [init] = parse_line(json.dumps({**INIT, "model": "m" * 150}))
    assert init == Init(session_id=SESSION, model="m" * 100)
    [result] = parse_line(json.dumps({"type": "result", "is_error": True}))
    assert result == Result(is_error=True, subtype="", text="", errors=())
    [single] = parse_line(json.dumps({"type": "result", "is_error": True, "errors": "overloaded"}))
    assert single.errors == ("overloaded",)  # one error given as a string is one error, not its characters


def test_numbers_at_the_ends_of_their_range_are_believed() -> None:
    from orchestrator.agent import MAX_COST_USD, MAX_DURATION_MS

    [free] = parse_line(json.dumps({**SUCCESS, "total_cost_usd": 0, "duration_ms": 0, "num_turns": 0}))
    assert (free.cost_usd, free.duration_ms, free.num_turns) == (0.0, 0, 0)
    [most] = parse_line(json.dumps({**SUCCESS, "total_cost_usd": MAX_COST_USD, "duration_ms": MAX_DURATION_MS}))
    assert (most.cost_usd, most.duration_ms) == (MAX_COST_USD, MAX_DURATION_MS)


def test_the_transcript_counts_tools_and_keeps_the_session_of_init_until_a_result_names_one() -> None:
    assert transcript_of(INIT, TOOL, TOOL).tools_used == 2
    started = transcript_of(INIT, TEXT)  # a turn killed before its result: the session is known from init
    assert started.session_id == SESSION
    unnamed = {k: v for k, v in SUCCESS.items() if k != "session_id"}
    assert transcript_of(INIT, unnamed).session_id == SESSION  # a result without one keeps init's
    assert transcript_of(SUCCESS).session_id == SESSION  # a result's own, with no init before it


def test_the_separator_between_texts_counts_two_bytes_toward_the_cap() -> None:
    both = texts("abcd", "efgh", answer_bytes=10)  # 4 + "\n\n" + 4: exactly the cap
    assert both.texts == ["abcd", "efgh"] and not both.truncated


def test_nothing_follows_a_cut_even_where_a_split_character_left_room() -> None:
    # 7 bytes: the second 4-byte emoji is cut whole, leaving 3 bytes that "\n\n" + "a" would fit in
    transcript = texts("😀😀", "a", answer_bytes=7)
    assert transcript.texts == ["😀"] and transcript.truncated


def test_an_unknown_session_is_found_in_stderr_or_in_the_results_errors_alone() -> None:
    gone = f"No conversation found with session ID: {SESSION}"
    told = Failure("The previous conversation could not be found.", unknown_session=True)
    assert outcome(TURN, transcript_of(INIT), 1, f"{gone}\n") == told  # the CLI died without a result line
    error = {"type": "result", "subtype": "error_during_execution", "is_error": True, "errors": [gone]}
    assert outcome(TURN, transcript_of(error), 1, "") == told


def test_the_user_is_told_what_happens_when_the_cli_stops_mid_answer() -> None:
    result = outcome(TURN, transcript_of(INIT), 137, "")
    assert isinstance(result, Failure)
    assert result.reason == ("Claude Code stopped in the middle of this answer (exit code 137). The conversation is "
                             "kept: your next message continues it, and nothing of this one runs again unless you ask.")


def error_reason(**fields: object) -> str:
    result = outcome(TURN, transcript_of({"type": "result", "is_error": True, **fields}), 1, "")
    assert isinstance(result, Failure)
    return result.reason


def test_the_clis_error_is_its_errors_else_its_text_else_its_subtype() -> None:
    assert error_reason(errors=["rate limited", "overloaded"], result="text", subtype="error") == \
        "Claude Code reported an error: rate limited; overloaded"
    assert error_reason(result="API Error: 500", subtype="error_during_execution") == \
        "Claude Code reported an error: API Error: 500"
    assert error_reason(subtype="error_max_turns") == "Claude Code reported an error: error_max_turns"


def test_an_error_of_exactly_the_shown_length_is_not_cut_and_a_longer_one_is_cut_with_an_ellipsis() -> None:
    from orchestrator.agent import ERROR_SHOWN

    assert error_reason(errors=["E" * ERROR_SHOWN]) == "Claude Code reported an error: " + "E" * ERROR_SHOWN
    assert error_reason(errors=["E" * (ERROR_SHOWN + 1)]) == "Claude Code reported an error: " + "E" * ERROR_SHOWN + "…"


def test_an_answer_without_streamed_text_is_the_results_text_else_a_note() -> None:
    assert outcome(TURN, transcript_of(INIT, SUCCESS), 0, "").text == "Done: the answer is 4."
    silent = {k: v for k, v in SUCCESS.items() if k != "result"}
    assert outcome(TURN, transcript_of(INIT, silent), 0, "").text == "(Claude Code finished without any text.)"
