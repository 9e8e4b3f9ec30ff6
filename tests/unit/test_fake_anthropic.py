"""The fake Messages API's planning (tests/fakes/anthropic.py): which tool call a prompt asks for, and what it says
after the tool's result. The request bodies copy the shapes the real CLI sent (/work/notes/cli_approvals.md)."""

from __future__ import annotations

import json
from typing import Any

from tests.fakes.anthropic import plan_answer, sse_events

ASK_INPUT = {"questions": [{"question": "Which colour?", "header": "Choice", "multiSelect": False,
                            "options": [{"label": "Blue", "description": "Answer Blue"},
                                        {"label": "Green", "description": "Answer Green"}]}]}


def body(*messages: tuple[str, Any]) -> dict[str, Any]:
    return {"model": "claude-fake", "messages": [{"role": role, "content": content} for role, content in messages]}


def asked(name: str, tool_input: dict[str, Any], tool_id: str = "toolu_1") -> tuple[str, Any]:
    return "assistant", [{"type": "text", "text": "Let me ask."},
                         {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}]


def result(content: str, tool_id: str = "toolu_1", is_error: bool = False) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": content, "is_error": is_error}


def said(blocks: list[dict[str, Any]]) -> list[str]:
    return [block["text"] for block in blocks if block["type"] == "text"]


def tool_call(prompt: str) -> tuple[list[str], str, dict[str, Any]]:
    blocks = plan_answer(body(("user", prompt)))[0]
    [tool] = [block for block in blocks if block["type"] == "tool_use"]
    return said(blocks), tool["name"], tool["input"]


def test_run_bash_asks_for_the_command_as_before() -> None:
    assert tool_call("RUN_BASH: touch /workspace/x") == (
        ["Running it now."], "Bash", {"command": "touch /workspace/x", "description": "run the requested command"})


def test_write_file_asks_for_a_write_of_the_rest_of_the_prompt() -> None:
    assert tool_call("WRITE_FILE: /workspace/notes.txt two words\nand a line") == (
        ["Writing it now."], "Write", {"file_path": "/workspace/notes.txt", "content": "two words\nand a line"})


def test_ask_user_asks_one_single_select_question_with_the_options_given() -> None:
    assert tool_call("ASK_USER: Which colour? | Blue | Green") == (["Let me ask."], "AskUserQuestion", ASK_INPUT)


def test_after_a_question_the_answer_is_what_the_tool_result_says() -> None:
    answered = 'Your questions have been answered: "Which colour?"="Blue". You can now continue.'
    blocks = plan_answer(body(("user", "ASK_USER: Which colour? | Blue | Green"),
                              asked("AskUserQuestion", ASK_INPUT), ("user", [result(answered)])))[0]
    assert said(blocks) == [f"answered: {answered}"]


def test_a_denied_tool_call_shows_its_refusal_after_ran() -> None:
    blocks = plan_answer(body(("user", "RUN_BASH: touch /workspace/x"), asked("Bash", {"command": "touch x"}),
                              ("user", [result("Denied by operator: not today", is_error=True)])))[0]
    assert said(blocks) == ["ran: Denied by operator: not today"]


def test_a_message_sent_mid_turn_next_to_a_tool_result_does_not_replace_the_answer_to_it() -> None:
    mid_turn = {"type": "text", "text": "The user sent a new message while you were working:\nRUN_BASH: rm -rf x"}
    blocks = plan_answer(body(("user", "RUN_BASH: touch x"), asked("Bash", {"command": "touch x"}),
                              ("user", [result("(Bash completed with no output)"), mid_turn])))[0]
    assert said(blocks) == ["ran: (Bash completed with no output)"]


def test_the_prompt_after_an_interrupted_tool_call_is_answered_as_a_new_one() -> None:
    refused = result("The user doesn't want to proceed with this tool use.", is_error=True)
    mark = {"type": "text", "text": "[Request interrupted by user for tool use]\n"}
    prompt = {"type": "text", "text": "ASK_USER: Which colour? | Blue | Green"}
    blocks = plan_answer(body(("user", "RUN_BASH: touch x"), asked("Bash", {"command": "touch x"}),
                              ("user", [refused, mark, prompt])))[0]
    assert [block["name"] for block in blocks if block["type"] == "tool_use"] == ["AskUserQuestion"]
    after_text = plan_answer(body(("user", [{"type": "text", "text": "[Request interrupted by user]\n"},
                                            {"type": "text", "text": "are you there"}])))[0]
    assert said(after_text) == ["Fake answer to: are you there"]


def test_a_question_streams_as_input_json_that_parses_back_to_its_input() -> None:
    blocks = plan_answer(body(("user", "ASK_USER: Which colour? | Blue | Green")))[0]
    usage = {"input_tokens": 10, "output_tokens": 10, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    deltas = [data["delta"]["partial_json"] for name, data in sse_events(body(), blocks, usage)
              if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta"]
    assert [json.loads(delta) for delta in deltas] == [ASK_INPUT]
