"""``celeriac multi``'s command line as pure logic: options, node selectors, templates, worker argv.

Nothing here starts or signals a process, so every rule can be unit-tested. The rules are
Celery's: node names or a count (``3`` = ``celery1 celery2 celery3``), then worker options in any
order; ``-Q:1-3 images`` gives an option to some nodes only (by 1-based position, range, name or
``name@host``, comma-separated), a plain option is the default for the other nodes, and a
per-node option beats the default whatever their order on the line. ``%n``, ``%h``, ``%d``,
``%i`` and ``%I`` in option values are expanded per node.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import click

__all__ = [
    "MultiSettings",
    "MultiUsageError",
    "Node",
    "Option",
    "OptionTable",
    "ParsedArgs",
    "build_nodes",
    "expand_template",
    "extract_signal",
    "parse_argv",
    "resolve_selector",
]

# Options ``multi`` reads itself; they are never passed to the workers.
_MULTI_VALUE_OPTIONS = {"--range-prefix": "range_prefix", "--hostname": "hostname", "-n": "hostname",
                        "--executable": "executable"}
_MULTI_FLAGS = {"--nosplash": "nosplash", "--quiet": "quiet", "-q": "quiet", "--verbose": "verbose",
                "--no-color": "no_color"}
# Celery spellings the worker knows under another name.
_ALIASES = {"-L": "-l", "-p": "--pidfile"}
_DEFAULT_PIDFILE = "%n.pid"
_DEFAULT_LOGFILE = "%n%I.log"
_RANGE = re.compile(r"(\d+)-(\d+)")
_RANGE_LIKE = re.compile(r"[\d-]+")


class MultiUsageError(ValueError):
    """Bad ``multi`` input; the message is one sentence saying what to change."""


@dataclass(frozen=True)
class OptionTable:
    """What ``multi`` knows about the options it passes on.

    ``keys`` maps each spelling (``-Q``, ``--queues``) to one key (``queues``), so ``-c:1 8`` overrides
    ``--concurrency=2``; ``values`` holds the spellings that take a value, ``flags`` those that never
    do; options under ``global_keys`` (``-A``, ``-b``, ...) go before the ``worker`` subcommand.
    Options not in the table keep Celery's rule: a short one takes the next word as its value unless
    that starts with ``-``, a long one only takes ``--name=value``.
    """

    keys: Mapping[str, str] = field(default_factory=dict)
    values: frozenset[str] = frozenset()
    flags: frozenset[str] = frozenset()
    global_keys: frozenset[str] = frozenset()

    @classmethod
    def from_commands(cls, root: click.Command | None, worker: click.Command | None) -> OptionTable:
        """The table for the options of ``root`` (global, before the subcommand) and ``worker``."""
        keys: dict[str, str] = {}
        values: set[str] = set()
        flags: set[str] = set()
        global_keys: set[str] = set()
        for command, is_global in ((worker, False), (root, True)):
            for param in command.params if command is not None else ():
                if not isinstance(param, click.Option) or param.name is None or param.name == "version":
                    continue
                spellings = [*param.opts, *param.secondary_opts]
                for spelling in spellings:
                    keys[spelling] = param.name
                    (flags if param.is_flag or param.count else values).add(spelling)
                if is_global:
                    global_keys.add(param.name)
        for alias, target in _ALIASES.items():
            if target in keys:
                keys[alias] = keys[target]
                (flags if target in flags else values).add(alias)
        return cls(keys, frozenset(values), frozenset(flags), frozenset(global_keys))

    def key(self, spelling: str) -> str:
        """The key of an option spelling (the spelling itself for an unknown option)."""
        if spelling in _MULTI_VALUE_OPTIONS:
            return _MULTI_VALUE_OPTIONS[spelling]
        if spelling in _MULTI_FLAGS:
            return _MULTI_FLAGS[spelling]
        return self.keys.get(spelling, spelling)

    def takes_value(self, spelling: str) -> bool | None:
        """True or False for a known option, None for an unknown one."""
        if spelling in _MULTI_VALUE_OPTIONS or spelling in self.values:
            return True
        if spelling in _MULTI_FLAGS or spelling in self.flags:
            return False
        return None


@dataclass(frozen=True)
class Option:
    """One option as typed: ``spelling`` (``-Q``), its ``key``, its value, and its node selector."""

    spelling: str
    key: str
    value: str | None
    selector: str | None = None

    def text(self) -> str:
        """The option as typed, for messages (``-Q:1-3 images``)."""
        name = f"{self.spelling}:{self.selector}" if self.selector is not None else self.spelling
        return name if self.value is None else f"{name} {self.value}"


@dataclass
class ParsedArgs:
    """The words after the ``multi`` action: node names, options, and words after ``--``."""

    names: list[str] = field(default_factory=list)
    options: list[Option] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)


def extract_signal(args: Iterable[str]) -> tuple[int | None, list[str]]:
    """Take a signal argument (``-KILL``, ``-SIGINT``, ``-9``) out of ``stop``'s words.

    Returns the signal (the last one given, None if none) and the other words.
    """
    found: int | None = None
    rest: list[str] = []
    for arg in args:
        number = _signal_number(arg)
        if number is None:
            rest.append(arg)
        else:
            found = number
    return found, rest


def _signal_number(arg: str) -> int | None:
    if not arg.startswith("-") or len(arg) < 2:
        return None
    name = arg[1:]
    if name.isdigit():
        return int(name)
    if len(name) < 2 or not name.isupper() or not name.isalnum():
        return None
    try:
        return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    except KeyError:
        return None


def parse_argv(args: Iterable[str], table: OptionTable) -> ParsedArgs:
    """Split ``multi``'s words into node names, options (with their selectors) and passthrough.

    Raises :class:`MultiUsageError` when an option that needs a value has none.
    """
    words = [arg for arg in args if arg]
    parsed = ParsedArgs()
    index = 0
    while index < len(words):
        value: str | None
        arg = words[index]
        index += 1
        if arg == "--":
            parsed.passthrough = words[index:]
            break
        if arg.startswith("--") and len(arg) > 2:
            head, equals, value = arg[2:].partition("=")  # --name:selector=value
            name, colon, selector = head.partition(":")
            spelling = f"--{name}"
            if not equals:
                value = None
                if table.takes_value(spelling):
                    value, index = _value_for(spelling, words, index)
            parsed.options.append(_option(table, spelling, value, selector if colon else None))
        elif arg.startswith("-") and len(arg) > 1:
            name, colon, selector = arg[1:].partition(":")
            spelling = f"-{name}"
            attached: str | None = None
            if len(name) > 1 and not colon and table.takes_value(f"-{name[0]}"):
                spelling, attached = f"-{name[0]}", name[1:]  # -c4, -linfo
            known = table.takes_value(spelling)
            if attached is not None:
                value = attached
            elif known:
                value, index = _value_for(arg, words, index)
            elif known is None and index < len(words) and not words[index].startswith("-"):
                value, index = words[index], index + 1
            else:
                value = None
            parsed.options.append(_option(table, spelling, value, selector if colon else None))
        else:
            parsed.names.append(arg)
    return parsed


def _value_for(option: str, words: list[str], index: int) -> tuple[str, int]:
    if index >= len(words) or (words[index].startswith("-") and len(words[index]) > 1):
        raise MultiUsageError(f"Option {option} needs a value: write it as {option} VALUE.")
    return words[index], index + 1


def _option(table: OptionTable, spelling: str, value: str | None, selector: str | None) -> Option:
    if selector is not None and not selector:
        raise MultiUsageError(f"Option '{spelling}:' has an empty node selector: write {spelling}:1-3, "
                              f"{spelling}:2,4 or {spelling}:NODENAME.")
    return Option(spelling, table.key(spelling), value, selector)


def expand_template(template: str, name: str, nodename: str, index: int = 0) -> str:
    """Expand ``%n`` (node name), ``%h`` (``name@host``), ``%d`` (the host's domain), ``%i`` (pool
    process index, 0 for the main process), ``%I`` (``-index``, empty for the main process) and
    ``%%`` in ``template``; any other ``%x`` stays as it is."""
    host = nodename.partition("@")[2]
    values = {"n": name, "N": name, "h": nodename, "d": host.partition(".")[2], "i": str(index),
              "I": f"-{index}" if index else "", "%": "%"}
    return re.sub(r"%(.)", lambda match: values.get(match.group(1), match.group(0)), template)


def _expand_host(template: str, host: str) -> str:
    """Expand ``%h`` (host), ``%n`` (host name before the first dot) and ``%d`` (domain) in a node name."""
    short, _, domain = host.partition(".")
    values = {"h": host, "n": short, "d": domain, "%": "%"}
    return re.sub(r"%(.)", lambda match: values.get(match.group(1), match.group(0)), template)


@dataclass
class MultiSettings:
    """The options ``multi`` reads itself (never passed to the workers)."""

    range_prefix: str = "celery"
    hostname: str = field(default_factory=socket.gethostname)
    executable: str = sys.executable
    nosplash: bool = False
    quiet: bool = False
    verbose: bool = False
    no_color: bool = False


@dataclass(eq=False)
class Node:
    """One node: its names and its options (key -> option, in command-line order); hashed by identity."""

    name: str
    nodename: str
    options: dict[str, Option]
    global_keys: frozenset[str] = frozenset()

    def expand(self, template: str) -> str:
        """``template`` with this node's ``%n``, ``%h``, ``%d`` (main process: ``%i`` = 0, ``%I`` empty)."""
        return expand_template(template, self.name, self.nodename)

    def value(self, key: str) -> str | None:
        """The expanded value of option ``key`` for this node (None when not given)."""
        option = self.options.get(key)
        return None if option is None or option.value is None else self.expand(option.value)

    def _path(self, key: str) -> str:
        base = os.path.abspath(os.path.expanduser(self.value("workdir") or os.getcwd()))
        return os.path.normpath(os.path.join(base, os.path.expanduser(self.value(key) or "")))

    @property
    def pidfile(self) -> str:
        """The absolute path of this node's pid file."""
        return self._path("pidfile")

    @property
    def logfile(self) -> str:
        """The absolute path of this node's log file (main process)."""
        return self._path("logfile")

    def worker_args(self) -> list[str]:
        """The ``worker`` subcommand's options for this node (the words after ``worker``)."""
        return self._args(global_part=False)

    def global_args(self) -> list[str]:
        """The global options for this node's worker (before ``worker``: ``-A``, ``-b``, ...)."""
        return self._args(global_part=True)

    def _args(self, global_part: bool) -> list[str]:
        words: list[str] = []
        for option in self.options.values():
            if (option.key in self.global_keys) != global_part:
                continue
            spelling = _ALIASES.get(option.spelling, option.spelling)
            if option.key in ("pidfile", "logfile"):
                words.append(f"--{option.key}={self._path(option.key)}")
            elif option.value is None:
                words.append(spelling)
            elif spelling.startswith("--"):
                words.append(f"{spelling}={self.expand(option.value)}")
            else:
                words += [spelling, self.expand(option.value)]
        return words

    def argv(self, executable: str, passthrough: Iterable[str] = ()) -> list[str]:
        """The full command line that starts this node as a detached worker."""
        return [executable, "-m", "celeriac", *self.global_args(), "worker", "--detach",
                *self.worker_args(), *passthrough]


def resolve_selector(option: Option, nodes: list[tuple[str, str]]) -> list[int]:
    """The 0-based positions of the nodes that ``option``'s selector names.

    ``nodes`` is the list of ``(name, nodename)``. A selector is a comma-separated list of node
    names, ``name@host``, 1-based positions and ``START-END`` ranges of positions. Raises
    :class:`MultiUsageError` for an unknown node or a malformed range.
    """
    selector = option.selector or ""
    where = f"{option.spelling}:{selector}"
    listed = ", ".join(name for name, _ in nodes)
    chosen: list[int] = []
    for item in selector.split(","):
        by_name = [i for i, (name, nodename) in enumerate(nodes) if item in (name, nodename)]
        if by_name:
            positions = by_name
        elif item.isdigit():
            positions = [_position(int(item), where, len(nodes))]
        elif _RANGE.fullmatch(item):
            start, end = (int(part) for part in item.split("-"))
            if start > end:
                raise MultiUsageError(f"Malformed node range {item!r} in {where}: write the smaller "
                                      f"number first, e.g. {option.spelling}:{end}-{start}.")
            positions = [_position(number, where, len(nodes)) for number in range(start, end + 1)]
        elif not item or _RANGE_LIKE.fullmatch(item):
            raise MultiUsageError(f"Malformed node range {item!r} in {where}: write START-END "
                                  f"(e.g. {option.spelling}:1-3) or a list (e.g. {option.spelling}:1,3).")
        else:
            raise MultiUsageError(f"Unknown node {item!r} in {where}: the nodes are {listed} "
                                  f"(or use their positions 1-{len(nodes)}).")
        chosen += [position for position in positions if position not in chosen]
    return chosen


def _position(number: int, where: str, count: int) -> int:
    if not 1 <= number <= count:
        raise MultiUsageError(f"Node {number} in {where} does not exist: positions run from 1 to {count}.")
    return number - 1


def build_nodes(parsed: ParsedArgs, table: OptionTable,
                settings: MultiSettings | None = None) -> tuple[list[Node], MultiSettings]:
    """The nodes described by ``parsed``, and ``multi``'s own settings read from it.

    Raises :class:`MultiUsageError` for missing or duplicate node names and bad selectors.
    """
    settings = settings or MultiSettings()
    worker_options: list[Option] = []
    for option in parsed.options:
        if option.spelling in _MULTI_VALUE_OPTIONS or option.spelling in _MULTI_FLAGS:
            if option.selector is not None:
                raise MultiUsageError(f"{option.spelling} applies to all nodes: drop the ':{option.selector}'.")
            setattr(settings, option.key, option.value if option.spelling in _MULTI_VALUE_OPTIONS else True)
        elif option.key != "detach":  # every node is started detached anyway
            worker_options.append(option)
    names = _node_names(parsed.names, settings)
    defaults: dict[str, Option] = {}
    for option in worker_options:
        if option.selector is None:
            defaults[option.key] = option  # the last one wins, in the place of the first
    per_node = [dict(defaults) for _ in names]
    for option in worker_options:
        if option.selector is not None:
            for position in resolve_selector(option, names):
                per_node[position][option.key] = option
    nodes = []
    for (name, nodename), options in zip(names, per_node, strict=True):
        options["hostname"] = Option("-n", "hostname", nodename)
        options.setdefault("pidfile", Option("--pidfile", "pidfile", _DEFAULT_PIDFILE))
        options.setdefault("logfile", Option("--logfile", "logfile", _DEFAULT_LOGFILE))
        nodes.append(Node(name, nodename, options, table.global_keys))
    return nodes, settings


def _node_names(words: list[str], settings: MultiSettings) -> list[tuple[str, str]]:
    if not words:
        raise MultiUsageError("Give the node names (w1 w2) or a count (3) after the action.")
    if len(words) == 1 and words[0].isdigit():
        count = int(words[0])
        if count < 1:
            raise MultiUsageError("The node count must be 1 or more.")
        words = [f"{settings.range_prefix}{number}" for number in range(1, count + 1)]
    names: list[tuple[str, str]] = []
    for word in words:
        if "@" in word:
            short, _, host = _expand_host(word, settings.hostname).partition("@")
        else:
            short, host = word, settings.hostname
        if not short or not host:
            raise MultiUsageError(f"Node name {word!r} is incomplete: write NAME or NAME@HOST.")
        nodename = f"{short}@{host}"
        if any(nodename == other for _, other in names):
            raise MultiUsageError(f"Node {nodename} is listed twice: give each node once.")
        names.append((short, nodename))
    return names
