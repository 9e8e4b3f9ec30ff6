"""Claude Code in Feishu chats, one Docker container per chat."""
