"""Chat ids become container names, labels and folder names, so they are checked before any of that."""

import re

_CHAT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def is_valid_chat_id(chat_id: object) -> bool:
    """Letters, digits, '_' and '-', not starting with '_' or '-', at most 64 characters."""
    return isinstance(chat_id, str) and _CHAT_ID.fullmatch(chat_id) is not None
