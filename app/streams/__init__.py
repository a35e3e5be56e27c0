"""The JetStream buffer of thread replies: events, publishing, and per-thread tails."""
