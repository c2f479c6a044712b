"""Configuration: one YAML file, validated once, mapped onto typed classes.

- :mod:`policyd.config.values`: durations, times of day, each value's check;
- :mod:`policyd.config.sections`: the sections, one attrs class each, every
  default documented;
- :mod:`policyd.config.loader`: the YAML loader that keeps lines and refuses
  duplicate keys, and the checks that involve several keys.
"""

from policyd.config.loader import config_path, load, load_text, read_domain_list
from policyd.config.sections import (
    Config,
    Content,
    Dns,
    DnsblZone,
    Exemptions,
    Heuristics,
    Http,
    Inbound,
    Limits,
    Listen,
    Log,
    NetworkList,
    Notify,
    Outbound,
    Quarantine,
    Store,
)
from policyd.config.values import (
    DEFAULT_PATH,
    Duration,
    format_duration,
    parse_duration,
    parse_time_of_day,
)

__all__ = [
    "DEFAULT_PATH", "Config", "Content", "Dns", "DnsblZone", "Duration", "Exemptions", "Heuristics", "Http",
    "Inbound", "Limits", "Listen", "Log", "NetworkList", "Notify", "Outbound", "Quarantine", "Store",
    "config_path", "format_duration", "load", "load_text", "parse_duration", "parse_time_of_day",
    "read_domain_list",
]
