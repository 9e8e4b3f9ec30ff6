"""The config reference in README.md and the example config.yaml are kept honest against the settings code.

Every key is derived from the dataclasses in orchestrator/config.py, so a key added there without docs fails
here: top-level scalars as `data_dir`, sections as `feishu.rate_per_chat`, the per-chat options as
`defaults.cpus`, and `groups` as `groups.<chat_id>`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from orchestrator.config import ChatOptions, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
EXAMPLE = REPO / "config.yaml"
SKIPPED = ("source",)  # where the settings were read from, not a key
GROUPS = "groups.<chat_id>"
# Values config.yaml sets on purpose to something other than the default, and why.
EXAMPLE_NOT_DEFAULT = {
    "access.allowed_users": "every user of an allowed chat, so that listing chat ids is all it takes",
}


def sections() -> dict[str, type | None]:
    """Each top-level key and its section dataclass (None for a scalar key or for `groups`)."""
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None
            for f in dataclasses.fields(Settings) if f.name not in SKIPPED}


def config_keys() -> list[str]:
    keys = []
    for name, section in sections().items():
        if name == "groups":
            keys.append(GROUPS)
        elif section is None:
            keys.append(name)
        else:
            keys += [f"{name}.{f.name}" for f in dataclasses.fields(section)]
    return keys


def reference() -> str:
    """README.md's configuration reference: from its `## Configuration` heading to the next `## ` one."""
    text = README.read_text()
    start = text.index("\n## Configuration\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def documented_keys() -> set[str]:
    """The keys in the first column of the reference's tables."""
    keys = set()
    for line in reference().splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2:
            keys.update(re.findall(r"`([^`]+)`", cells[1]))
    return keys


def example_block(section: str) -> list[str]:
    """The lines of config.yaml's top-level `section:` up to the next top-level key (comments included)."""
    lines = EXAMPLE.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(rf"{re.escape(section)}:(\s|$)", line)]
    assert starts, f"config.yaml has no top-level `{section}:`"
    block = []
    for line in lines[starts[0] + 1:]:
        if re.match(r"[A-Za-z_]", line):
            break
        block.append(line)
    return block


def test_keys_are_derived_from_the_settings_code() -> None:
    keys = config_keys()
    assert {"data_dir", "instance", "agent.env", "defaults.require_mention", GROUPS, "feishu.rate_per_chat",
            "shutdown.keep_containers", "logging.json"} <= set(keys)
    assert len(keys) == len(set(keys))
    assert sections()["defaults"] is ChatOptions


@pytest.mark.parametrize("key", config_keys())
def test_the_readme_documents_every_key(key: str) -> None:
    assert f"`{key}`" in reference(), f"README.md's configuration reference does not document `{key}`"


def test_the_readme_documents_no_key_that_does_not_exist() -> None:
    stale = documented_keys() - set(config_keys())
    assert not stale, f"README.md's configuration reference documents keys the settings do not have: {stale}"


def test_the_readme_explains_interpolation_and_errors() -> None:
    text = reference()
    for phrase in ("${VAR}", "${VAR:-default}", "unknown key", "config check"):
        assert phrase in text


def test_the_example_config_shows_every_section() -> None:
    text = EXAMPLE.read_text()
    for name in sections():
        assert re.search(rf"^{re.escape(name)}:", text, re.MULTILINE), f"config.yaml lacks the `{name}` section"


@pytest.mark.parametrize("key", [key for key in config_keys() if "." in key and key != GROUPS])
def test_the_example_config_shows_every_key(key: str) -> None:
    section, name = key.split(".")
    block = example_block(section)
    assert any(re.match(rf"\s+(#\s*)?{re.escape(name)}:", line) for line in block), \
        f"config.yaml's `{section}` section does not show `{name}` (as a key or a commented-out one)"


def test_the_example_config_shows_the_defaults() -> None:
    """'The values shown are the defaults': what config.yaml sets equals what the code defaults to."""
    settings = load_settings(EXAMPLE, {})
    defaults = Settings(source=EXAMPLE, data_dir=REPO / "data")
    for key in config_keys():
        if key == GROUPS or key in EXAMPLE_NOT_DEFAULT:
            continue
        section, _, name = key.partition(".")
        shown, default = getattr(settings, section), getattr(defaults, section)
        if name:
            shown, default = getattr(shown, name), getattr(default, name)
        assert shown == default, f"config.yaml sets {key} to {shown!r}, but the default is {default!r}"
    assert settings.groups == {}
