"""The embedded demo run by ``make demo``."""
