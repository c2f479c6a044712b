"""Loading the configuration: a YAML loader that keeps lines and refuses duplicate keys.

Each error names the key and the line: ``policyd.yaml:12: outbound.block_for:
must be at most 72h (got '100h')``.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import attrs
import yaml

from policyd.addresses import normalise_domain
from policyd.config.sections import (
    Config,
)
from policyd.config.values import (
    DEFAULT_PATH,
    Duration,
    parse_duration,
)
from policyd.errors import ConfigError

# --- loading ----------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A safe loader whose mappings refuse duplicate keys."""


def _yaml_key(name: str) -> str:
    return "from" if name == "from_" else name


def _where(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


class _Builder:
    """Walks composed YAML nodes into the attrs classes above."""

    def __init__(self, source: str, loader: _Loader) -> None:
        self.source = source
        self.loader = loader

    def fail(self, node: yaml.Node, key: str, message: str) -> ConfigError:
        return ConfigError(f"{_where(self.source, node)}: {key}: {message}")

    def scalar(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, "expected a single value, not a list or mapping")
        return self.loader.construct_object(node, deep=True)

    def build(self, cls: type, node: yaml.Node, prefix: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
                return cls()
            raise self.fail(node, prefix or "(top level)", "expected a mapping of keys")
        fields = {_yaml_key(f.name): f for f in attrs.fields(cls) if not f.metadata.get("internal")}
        hints = typing.get_type_hints(cls)
        hints.update({f.name: f.metadata["type"] for f in attrs.fields(cls) if "type" in f.metadata})
        values: dict[str, Any] = {}
        seen: set[str] = set()
        for key_node, value_node in node.value:
            name = str(self.scalar(key_node, prefix or "(top level)"))
            key = f"{prefix}.{name}" if prefix else name
            if name in seen:
                raise self.fail(key_node, key, "duplicate key")
            seen.add(name)
            field = fields.get(name)
            if field is None:
                raise self.fail(key_node, key, "unknown key")
            value = self.value(hints[field.name], value_node, key)
            check = field.metadata.get("check")
            if check is not None and value is not None:
                try:
                    check(value)
                except ValueError as error:
                    raise self.fail(value_node, key, f"{error} (got {self.shown(value_node)})") from None
            values[field.name] = value
        return cls(**values)

    def shown(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.ScalarNode):
            return repr(node.value)
        return "a " + ("list" if isinstance(node, yaml.SequenceNode) else "mapping")

    def value(self, hint: Any, node: yaml.Node, key: str) -> Any:
        origin = typing.get_origin(hint)
        if origin in (Union, types.UnionType):
            options = typing.get_args(hint)
            if type(None) in options and isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
                return None
            errors = []
            for option in options:
                if option is type(None):
                    continue
                try:
                    return self.value(option, node, key)
                except ConfigError as error:
                    errors.append(str(error).rsplit(": ", 1)[-1])
            raise self.fail(node, key, " or ".join(errors))
        if origin is list:
            if not isinstance(node, yaml.SequenceNode):
                raise self.fail(node, key, "expected a list")
            (item,) = typing.get_args(hint)
            return [self.value(item, child, f"{key}[{i}]") for i, child in enumerate(node.value)]
        if origin is dict:
            if not isinstance(node, yaml.MappingNode):
                raise self.fail(node, key, "expected a mapping")
            _, item = typing.get_args(hint)
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                name = str(self.scalar(key_node, key))
                if name in result:
                    raise self.fail(key_node, f"{key}.{name}", "duplicate key")
                result[name] = self.value(item, value_node, f"{key}.{name}")
            return result
        if attrs.has(hint):
            return self.build(hint, node, key)
        raw = self.scalar(node, key)
        if hint is Duration:
            try:
                return Duration(parse_duration(raw))
            except ValueError as error:
                raise self.fail(node, key, f"{error} (got {raw!r})") from None
        if hint is bool:
            if not isinstance(raw, bool):
                raise self.fail(node, key, f"expected true or false (got {raw!r})")
            return raw
        if hint is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise self.fail(node, key, f"expected a whole number (got {raw!r})")
            return raw
        if hint is float:
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise self.fail(node, key, f"expected a number (got {raw!r})")
            return float(raw)
        if hint is str:
            if not isinstance(raw, str):
                raise self.fail(node, key, f"expected a text value (got {raw!r})")
            return raw
        raise self.fail(node, key, f"unsupported type {hint!r}")  # pragma: no cover


def _compose(text: str, source: str) -> tuple[yaml.Node | None, _Loader]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else "?"
        raise ConfigError(f"{source}:{line}: not valid YAML: {error.problem or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    return node, loader


def load_text(text: str, source: str = "<config>") -> Config:
    """Parse and validate configuration text.

    :raises ConfigError: naming the file, line and key of the first problem.
    """
    node, loader = _compose(text, source)
    try:
        if node is None:
            config = Config()
        else:
            config = _Builder(source, loader).build(Config, node, "")
    finally:
        loader.dispose()
    config = attrs.evolve(config, source=source)
    _cross_check(config, node)
    return config


def _cross_check(config: Config, node: yaml.Node | None) -> None:
    """Checks that involve several keys."""
    where = f"{config.source}:{node.start_mark.line + 1 if node else 1}"
    if config.inbound.tag_at > config.inbound.reject_at:
        raise ConfigError(f"{where}: inbound.tag_at: must not be above inbound.reject_at")
    for account, limit in config.outbound.overrides.items():
        if limit < 1:
            raise ConfigError(f"{where}: outbound.overrides.{account}: must be at least 1")
    read_domain_list(config.local_domains, where)
    for zone in config.inbound.dnsbl:
        if not zone.zone:
            raise ConfigError(f"{where}: inbound.dnsbl: every entry needs a zone")
    for network in config.inbound.networks:
        if not network.file:
            raise ConfigError(f"{where}: inbound.networks: every entry needs a file")
    arc = config.forwarding.arc
    if arc is not None and not (arc.domain and arc.selector and arc.key):
        raise ConfigError(f"{where}: forwarding.arc: needs domain, selector and key")
    if config.quarantine.digest_at and not (config.listen.http or config.quarantine.base_url):
        raise ConfigError(
            f"{where}: quarantine.digest_at: the digest's links need the self-service pages: "
            "set listen.http (or quarantine.base_url when another host serves them)"
        )
    if config.quarantine.digest_at and not config.quarantine.base_url and config.listen.http:
        if not config.listen.http.startswith(("tcp:", "tcp6:", "ssl:")):
            raise ConfigError(
                f"{where}: quarantine.base_url: needed when listen.http is not a TCP port "
                "(the address users open the digest's links at)"
            )


def config_path(path: str | None) -> str:
    """The file to read: ``-c``, else ``$POLICYD_CONFIG``, else the default."""
    return path or os.environ.get("POLICYD_CONFIG") or DEFAULT_PATH


def load(path: str | None = None) -> Config:
    """Read and validate the configuration file.

    :raises ConfigError: when the file cannot be read or is invalid.
    """
    chosen = config_path(path)
    try:
        text = Path(chosen).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{chosen}: configuration file not found (use -c FILE or $POLICYD_CONFIG)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{chosen}: cannot read configuration: {error}") from None
    return load_text(text, chosen)


def read_domain_list(value: Sequence[str] | str, source: str) -> frozenset[str]:
    """Local domains from a list or from a file of one domain per line.

    :raises ConfigError: when the file cannot be read.
    """
    if isinstance(value, str):
        try:
            lines = Path(value).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError(f"{source}: local_domains: cannot read {value}: {error.strerror}") from None
        value = [line.split("#", 1)[0].strip() for line in lines]
    return frozenset(normalise_domain(d) for d in value if d.strip())

