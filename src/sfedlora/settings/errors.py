"""The one error a bad config raises."""


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message names field and fix."""
