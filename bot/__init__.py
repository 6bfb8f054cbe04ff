"""slack-gpt-bot: a Slack bot that answers in threads with an OpenAI-compatible chat model."""
