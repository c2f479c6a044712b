"""The two daemons: ``policyd serve`` (policy) and ``policyd milter`` (content), wired once from the configuration."""
