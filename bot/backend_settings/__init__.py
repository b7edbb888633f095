"""The model and webhook backends' settings: read and validated by `bot.config`.

Below both `bot.config` and `bot.backends`: reading the configuration imports neither
a backend nor what it needs, and a backend imports its settings from here.
"""
