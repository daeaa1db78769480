"""Signatures and the canvas: chain, group, chord, chunks, xmap, xstarmap.

A :class:`Signature` is a dict with Celery's keys (``task``, ``args``, ``kwargs``, ``options``,
``subtask_type``, ``immutable``), so it travels inside messages as is. Sending a canvas follows
Celery's protocol v2: a chain sends its first task with the rest in ``embed.chain`` (reversed), a
group sends one message per member with ``group``/``group_index``, a chord sends its header with
``embed.chord`` = the body, and the worker advances them.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from celeriac.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.result import GroupResult

__all__ = [
    "Signature",
    "chain",
    "chord",
    "chunks",
    "final_signatures",
    "group",
    "maybe_signature",
    "signature",
    "xmap",
    "xstarmap",
]

# Options that place a task inside a workflow (chord membership); they belong to the step that
# reports to the chord: the last step of a chain, the body of a nested chord.
_WORKFLOW_OPTIONS = ("chord", "group_id", "group_index")


def _default_app() -> Celeriac:
    from celeriac.current import current_app

    return current_app()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class Signature(dict[str, Any]):
    """A task call described as data: ``add.s(2, 2)``, ``signature('proj.add', (2, 2))``."""

    TYPES: dict[str, type[Signature]] = {}
    subtask_type_name: str | None = None

    def __init__(self, task: Any = None, args: Any = None, kwargs: Any = None,
                 options: dict[str, Any] | None = None, subtask_type: str | None = None,
                 immutable: bool = False, app: Celeriac | None = None, **extra_options: Any) -> None:
        if isinstance(task, dict):
            source = task
            dict.__init__(self, task=source.get("task"), args=list(source.get("args") or ()),
                          kwargs=dict(source.get("kwargs") or {}),
                          options=dict(source.get("options") or {}),
                          subtask_type=source.get("subtask_type"),
                          immutable=bool(source.get("immutable", False)))
            self._app = app or getattr(task, "_app", None)
            return
        name = getattr(task, "name", task)
        self._app = app or getattr(task, "app", None)
        dict.__init__(self, task=name, args=list(args or ()), kwargs=dict(kwargs or {}),
                      options={**(options or {}), **extra_options},
                      subtask_type=subtask_type or self.subtask_type_name, immutable=immutable)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.subtask_type_name:
            Signature.TYPES[cls.subtask_type_name] = cls

    @classmethod
    def from_dict(cls, data: dict[str, Any], app: Celeriac | None = None) -> Signature:
        """Rebuild the right signature class from its dict form (as found in messages)."""
        kind = data.get("subtask_type")
        target = Signature.TYPES.get(kind) if kind else None
        if target is not None and target is not cls:
            return target.from_dict(data, app)
        return cls(data, app=app)

    # -- fields -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The task name."""
        return str(self["task"])

    task = name

    @property
    def args(self) -> list[Any]:
        """Partial positional arguments."""
        return self["args"]  # type: ignore[no-any-return]

    @property
    def kwargs(self) -> dict[str, Any]:
        """Partial keyword arguments."""
        return self["kwargs"]  # type: ignore[no-any-return]

    @property
    def options(self) -> dict[str, Any]:
        """``apply_async`` options."""
        return self["options"]  # type: ignore[no-any-return]

    @property
    def immutable(self) -> bool:
        """True when parent results are not prepended to the arguments."""
        return bool(self["immutable"])

    @property
    def id(self) -> str | None:
        """The task id assigned by :meth:`freeze`, if any."""
        return self.options.get("task_id")

    @property
    def app(self) -> Celeriac:
        """The app this signature sends through."""
        if self._app is None:
            self._app = _default_app()
        return self._app

    @property
    def type(self) -> Any:
        """The registered :class:`Task` this signature calls."""
        return self.app.tasks[self.name]

    def __json__(self) -> dict[str, Any]:
        return dict(self)

    def __reduce__(self) -> Any:
        return (type(self).from_dict, (dict(self),))

    # -- partial application ------------------------------------------------------------------

    def _merge(self, args: Any = None, kwargs: Any = None,
               options: dict[str, Any] | None = None) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
        merged_options = dict(self.options)
        for key, value in (options or {}).items():
            if key == "group_id" and merged_options.get("group_id"):
                continue
            merged_options[key] = value
        if self.immutable:
            return tuple(self.args), dict(self.kwargs), merged_options
        return (tuple(args or ()) + tuple(self.args), {**self.kwargs, **(kwargs or {})},
                merged_options)

    def _partial_args(self, args: Any) -> tuple[Any, ...]:
        """Call-time ``args`` completed by the stored ones (composites pass them to members)."""
        if self.immutable:
            return tuple(self.args)
        return tuple(args or ()) + tuple(self.args)

    def clone(self, args: Any = None, kwargs: Any = None, **options: Any) -> Signature:
        """A copy with ``args`` prepended, ``kwargs`` merged and ``options`` laid over."""
        import copy

        new_args, new_kwargs, new_options = self._merge(args, kwargs, options)
        data = dict(self)
        data.update(args=list(new_args), kwargs=copy.deepcopy(new_kwargs),
                    options=copy.deepcopy(new_options))
        return type(self).from_dict(data, self._app)

    partial = clone

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        """Set options in place; return self for chaining."""
        if immutable is not None:
            self["immutable"] = immutable
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        """Make this signature (im)mutable."""
        self["immutable"] = immutable

    def _append_option(self, key: str, value: Any) -> Any:
        items = self.options.get(key)
        if not isinstance(items, list):
            items = self.options[key] = _as_list(items)
        if value not in items:
            items.append(value)
        return value

    def link(self, callback: Signature) -> Signature:
        """Call ``callback`` with this task's result when it succeeds; return ``callback``."""
        return self._append_option("link", callback)  # type: ignore[no-any-return]

    def link_error(self, errback: Signature) -> Signature:
        """Call ``errback`` when this task fails; return ``errback``.

        An errback whose task takes one argument is sent with the failed task's id; one that
        takes more (``(request, exc, traceback)``) is called inline in the worker, as in Celery.
        """
        return self._append_option("link_error", errback)  # type: ignore[no-any-return]

    def on_error(self, errback: Signature) -> Signature:
        """:meth:`link_error` that returns this signature (``add.s(1, 2).on_error(eb).delay()``)."""
        self.link_error(errback)
        return self

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Assign the task id now (and the workflow options given); return its result handle.

        An id already assigned is kept, so freezing twice gives the same handle.
        """
        from celeriac.result import AsyncResult

        opts = self.options
        task_id = opts.get("task_id") or _id or str(uuid.uuid4())
        opts["task_id"] = task_id
        # Results of later steps go to the caller's reply queue (rpc://), as Celery does.
        opts.setdefault("reply_to", self.app.thread_oid)
        if root_id:
            opts["root_id"] = root_id
        if parent_id:
            opts["parent_id"] = parent_id
        if group_id and not opts.get("group_id"):
            opts["group_id"] = group_id
        if chord is not None:
            opts["chord"] = chord
        if group_index is not None:
            opts["group_index"] = group_index
        return AsyncResult(task_id, app=self.app, task_name=self.name)

    # -- calling ------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task inline with the partial arguments completed by these."""
        new_args, new_kwargs, _ = self._merge(args, kwargs)
        return self.type(*new_args, **new_kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """Send with these extra arguments; shortcut for ``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Send the task; returns an :class:`AsyncResult` (``EagerResult`` when eager)."""
        options = {k: v for k, v in options.items() if v is not None}
        new_args, new_kwargs, new_options = self._merge(args, kwargs, options)
        if self.app.conf.get("task_always_eager"):
            return self.apply(args, kwargs, **options)
        task = self.app.tasks.get(self.name)
        if task is not None:
            return task.apply_async(new_args, new_kwargs, **new_options)
        return self.app.send_task(self.name, new_args, new_kwargs, **new_options)

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Run here and now; returns an ``EagerResult``."""
        new_args, new_kwargs, new_options = self._merge(args, kwargs, options)
        for key in ("chain", "chord", "group_id", "group_index", "queue", "countdown", "eta",
                    "expires", "priority", "routing_key", "exchange", "root_id", "parent_id",
                    "reply_to", "serializer", "shadow", "time_limit", "soft_time_limit",
                    "ignore_result"):
            new_options.pop(key, None)
        link = new_options.pop("link", None)
        link_error = new_options.pop("link_error", None)
        return self.type.apply(new_args, new_kwargs, link=_as_sigs(link, self._app),
                               link_error=_as_sigs(link_error, self._app), **new_options)

    # -- composition --------------------------------------------------------------------------

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        if isinstance(other, _chain):
            return _chain(self, *other._unchained(), app=self._app)
        if isinstance(other, Signature):
            return _chain(self, other, app=self._app)
        return NotImplemented

    def __invert__(self) -> Any:
        """``~sig``: send it and wait for its result (``sig.apply_async().get()``), as in
        Celery's guide (``~xsum.map([range(10), range(100)])``). Raises what ``get()`` raises."""
        return self.apply_async().get()

    def __repr__(self) -> str:
        args = ", ".join(repr(a) for a in self.args)
        kwargs = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        joined = ", ".join(p for p in (args, kwargs) if p)
        prefix = "%" if self.immutable else ""
        return f"{prefix}{self.name}({joined})"

    def __copy__(self) -> Signature:
        return type(self).from_dict(dict(self), self._app)

    def __deepcopy__(self, memo: dict[int, Any]) -> Signature:
        import copy

        return type(self).from_dict(copy.deepcopy(dict(self), memo), self._app)


def _as_sigs(value: Any, app: Celeriac | None) -> list[Signature] | None:
    if not value:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    return [maybe_signature(v, app) for v in items]


def maybe_signature(value: Any, app: Celeriac | None = None) -> Signature:
    """Return ``value`` as a :class:`Signature` (dicts are converted)."""
    if isinstance(value, Signature):
        if app is not None and value._app is None:
            value._app = app
        return value
    if isinstance(value, dict):
        return Signature.from_dict(value, app)
    raise TypeError(f"Expected a signature or its dict form, got {type(value).__name__}.")


def signature(varies: Any, *args: Any, **kwargs: Any) -> Signature:
    """Build a signature from a task name, a dict or another signature."""
    if isinstance(varies, dict) and not args and not kwargs:
        return Signature.from_dict(varies)
    return Signature(varies, *args, **kwargs)


subtask = signature


def chord_size(sig: Any, app: Celeriac | None = None) -> int:
    """How many completions ``sig`` contributes as a chord header member.

    A task counts one; a group the sum of its members; a chain what its last step counts (it
    is the last step that reports to the chord); a nested chord what its body counts (the body
    reports to the outer chord).
    """
    sig = maybe_signature(sig, app)
    if isinstance(sig, group):
        return sum(chord_size(m, app) for m in sig._members())
    if isinstance(sig, _chain):
        for step in reversed(sig._steps()):
            size = chord_size(step, app)
            if size:
                return size
        return 0
    if isinstance(sig, chord):
        return chord_size(sig.body, app) if sig.body is not None else 0
    if isinstance(sig, chunks):
        return chord_size(sig.group(), app)
    return 1


def _expand(sig: Signature) -> Signature:
    """A chunks signature inside another primitive runs as its group of ``xstarmap`` tasks."""
    return sig.group() if isinstance(sig, chunks) else sig


def final_signatures(sig: Any, app: Celeriac | None = None) -> list[Signature]:
    """The signatures whose results stand for ``sig``'s outcome: itself for a task, a chain's
    last step, a chord's body, every member of a group (recursively)."""
    sig = _expand(maybe_signature(sig, app))
    if isinstance(sig, group):
        return [f for m in sig._members() for f in final_signatures(m, app)]
    if isinstance(sig, _chain):
        return final_signatures(sig.tasks[-1], app) if sig.tasks else []
    if isinstance(sig, chord):
        return final_signatures(sig.body, app) if sig.body is not None else []
    return [sig]


def _attach_parent(result: Any, parent: Any) -> None:
    """Make ``parent`` the parent of the first node of ``result``'s parent chain."""
    node = result
    seen: set[int] = set()
    while getattr(node, "parent", None) is not None and id(node) not in seen:
        seen.add(id(node))
        node = node.parent
    if node is not parent:
        node.parent = parent


def _splice(tasks: Iterable[Any], app: Celeriac | None) -> list[Signature]:
    """Copies of ``tasks`` with nested chains spliced in (keeping their links)."""
    flat: list[Signature] = []
    for task in tasks:
        sig = maybe_signature(task, app)
        if isinstance(sig, _chain):
            flat.extend(_splice(sig._unchained(), app))
        else:
            flat.append(_expand(sig.clone()))
    return flat


class _chain(Signature):
    """Tasks run one after the other, each receiving the previous result.

    Links set on the chain go to its last step when it is sent, error links to every step, so
    they fire whichever step fails (and survive extending the chain with ``|``).
    """

    subtask_type_name = "chain"

    def __init__(self, *tasks: Any, app: Celeriac | None = None, **options: Any) -> None:
        if len(tasks) == 1 and isinstance(tasks[0], dict) and tasks[0].get("subtask_type") == "chain":
            data = tasks[0]
            super().__init__(data, app=app)
            self.kwargs["tasks"] = [maybe_signature(t, self._app) for t in self.kwargs["tasks"]]
            return
        if len(tasks) == 1 and not isinstance(tasks[0], dict) and isinstance(tasks[0], Iterable):
            tasks = tuple(tasks[0])
        app = app or next((getattr(t, "_app", None) for t in tasks if getattr(t, "_app", None)), None)
        super().__init__("celery.chain", (), {"tasks": _splice(tasks, app)}, options, app=app)

    @classmethod
    def from_dict(cls, data: dict[str, Any], app: Celeriac | None = None) -> Signature:
        return cls(data, app=app)

    @property
    def tasks(self) -> list[Signature]:
        """The steps."""
        return self.kwargs["tasks"]  # type: ignore[no-any-return]

    def _unchained(self) -> list[Signature]:
        """Copies of the steps carrying the chain's links: callbacks on the last step, error
        callbacks on every step."""
        steps = [t.clone() for t in self.tasks]
        if steps:
            for callback in _as_list(self.options.get("link")):
                steps[-1].link(maybe_signature(callback, self._app))
            for errback in _as_list(self.options.get("link_error")):
                for step in steps:
                    step.link_error(maybe_signature(errback, self._app))
        return steps

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        if isinstance(other, _chain):
            return _chain(*self._unchained(), *other._unchained(), app=self._app)
        if isinstance(other, Signature):
            return _chain(*self._unchained(), other, app=self._app)
        return NotImplemented

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks) if self.tasks else "chain()"

    def _steps(self, args: Any = None, kwargs: Any = None) -> list[Signature]:
        """The steps as sent: nested chains spliced in, a group or chord followed by more steps
        turned into a chord whose body is the rest of the chain."""
        flat = _splice(self.tasks, self._app)
        if flat and (args or kwargs):
            flat[0] = flat[0].clone(args, kwargs)
        for index, step in enumerate(flat[:-1]):
            rest = flat[index + 1:]
            tail = rest[0] if len(rest) == 1 else _chain(*rest, app=self._app)
            if isinstance(step, group):
                return flat[:index] + [chord(step, tail, app=self._app)]
            if isinstance(step, chord) and step.body is not None:
                folded = chord(step.header, _chain(step.body, tail, app=self._app),
                               app=self._app, **step.options)
                folded["args"] = list(step.args)
                return flat[:index] + [folded]
        return flat

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def _freeze_steps(self, steps: list[Signature], _id: str | None, group_id: str | None,
                      chord_body: Any, group_index: int | None, root_id: str | None) -> list[Any]:
        results: list[Any] = []
        last = len(steps) - 1
        for index, step in enumerate(steps):
            if index == last:
                frozen = step.freeze(_id, group_id=group_id, chord=chord_body,
                                     group_index=group_index, root_id=root_id)
            else:
                frozen = step.freeze(root_id=root_id)
            if results:
                _attach_parent(frozen, results[-1])
            results.append(frozen)
        return results

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Assign every step's id (the workflow options go to the last step); return the last
        step's result handle."""
        steps = self._steps()
        if not steps:
            raise ValueError("Cannot freeze an empty chain.")
        _id = _id or self.options.get("task_id")
        results = self._freeze_steps(steps, _id, group_id, chord, group_index, root_id)
        self.kwargs["tasks"] = steps
        self.options["task_id"] = steps[-1].id
        return results[-1]

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Send the first step with the rest in ``embed.chain``; return the last step's result."""
        if self.app.conf.get("task_always_eager"):
            return self.apply(args, kwargs, **options)
        options = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        steps = self._steps(self._partial_args(args) if args else None, kwargs)
        if not steps:
            raise ValueError("Cannot send an empty chain.")
        # As Celery: the chain's callbacks become options of its last step (so a last group
        # gives them to every member; a last chord, to its body), its errbacks are linked to
        # every step.
        for callback in _as_list(options.pop("link", None)):
            if isinstance(steps[-1], chord):
                steps[-1].link(maybe_signature(callback, self._app))
            else:
                steps[-1]._append_option("link", maybe_signature(callback, self._app))
        for errback in _as_list(options.pop("link_error", None)):
            for step in steps:
                step.link_error(maybe_signature(errback, self._app))
        task_id = options.pop("task_id", None)
        group_id = options.pop("group_id", None)
        group_index = options.pop("group_index", None)
        chord_body = options.pop("chord", None)
        inherited = list(options.pop("chain", None) or [])
        results = self._freeze_steps(steps, task_id, group_id, chord_body, group_index,
                                     options.get("root_id"))
        remaining = [dict(s) for s in reversed(steps[1:])]
        sent = steps[0].apply_async(chain=inherited + remaining or None, **options)
        if len(steps) == 1:
            return sent
        return results[-1]

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Run every step here and now; returns the last ``EagerResult``. The chain's and the
        call's error callbacks apply to every step, its callbacks to the last one."""
        options = {**self.options, **options}
        options.pop("task_id", None)
        link = options.pop("link", None)
        result: Any = None
        steps = self._steps()
        for index, step in enumerate(steps):
            extra = dict(options, link=link) if index == len(steps) - 1 and link else options
            if index == 0:
                result = step.apply(args, kwargs, **extra)
            else:
                previous = result.get()
                result = step.apply((previous,), **extra)
            if result.failed():
                return result
        return result


class chain(_chain):
    """``chain(a, b, c)``: run ``a``, then ``b`` with ``a``'s result, then ``c``."""


Signature.TYPES["chain"] = _chain


class group(Signature):
    """``group(a, b, c)``: run the tasks in parallel; the result is the list of their results."""

    subtask_type_name = "group"

    def __init__(self, *tasks: Any, app: Celeriac | None = None, **options: Any) -> None:
        if len(tasks) == 1 and isinstance(tasks[0], dict) and tasks[0].get("subtask_type") == "group":
            super().__init__(tasks[0], app=app)
            self.kwargs["tasks"] = [maybe_signature(t, self._app) for t in self.kwargs["tasks"]]
            return
        if len(tasks) == 1 and not isinstance(tasks[0], dict) and isinstance(tasks[0], Iterable):
            tasks = tuple(tasks[0])
        app = app or next((getattr(t, "_app", None) for t in tasks if getattr(t, "_app", None)), None)
        members = [maybe_signature(t, app) for t in tasks]
        super().__init__("celery.group", (), {"tasks": members}, options, app=app)

    @classmethod
    def from_dict(cls, data: dict[str, Any], app: Celeriac | None = None) -> Signature:
        return cls(data, app=app)

    @property
    def tasks(self) -> list[Signature]:
        """The members."""
        return self.kwargs["tasks"]  # type: ignore[no-any-return]

    def _members(self) -> list[Signature]:
        flat: list[Signature] = []
        for task in self.tasks:
            sig = maybe_signature(task, self._app)
            if isinstance(sig, chunks):
                sig = sig.group()
            if isinstance(sig, group):
                flat.extend(sig._members())
            else:
                flat.append(sig)
        return flat

    def link(self, callback: Signature) -> Signature:
        """Call ``callback`` (made immutable) once, when the first member succeeds."""
        members = self._members()
        if members:
            members[0].link(maybe_signature(callback, self._app).clone().set(immutable=True))
        return callback

    def link_error(self, errback: Signature) -> Signature:
        """Give every member a copy of ``errback``: it runs once per failing member."""
        errback = maybe_signature(errback, self._app)
        for member in self._members():
            member.link_error(errback.clone())
        return errback

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        if isinstance(other, Signature) and not isinstance(other, group):
            return chord(self, body=other, app=self._app)
        return super().__or__(other)

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> GroupResult:
        """Assign the group id and every member's id; members of a group that is itself part
        of a chord (``group_id``/``chord`` given) report to that chord."""
        from celeriac.result import GroupResult

        gid = self.options.get("task_id") or _id or str(uuid.uuid4())
        self.options["task_id"] = gid
        members = self._members()
        results = [m.freeze(group_id=group_id or gid, chord=chord, root_id=root_id,
                            group_index=i if group_index is None else group_index)
                   for i, m in enumerate(members)]
        self.kwargs["tasks"] = members
        return GroupResult(gid, results, app=self.app)

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Send one message per member; return their :class:`GroupResult`."""
        from celeriac.result import GroupResult

        if options.get("link") is not None or options.get("link_error") is not None:
            raise TypeError("Cannot add links to a group when sending it: link the members, or "
                            "use a chord for a callback after all of them (as Celery).")
        if self.app.conf.get("task_always_eager"):
            return self.apply(args, kwargs, **options)
        options = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        args = self._partial_args(args)
        gid = options.pop("task_id", None) or str(uuid.uuid4())
        member_gid = options.pop("group_id", None) or gid
        group_index = options.pop("group_index", None)
        chord_body = options.pop("chord", None)
        options.pop("chain", None)
        callbacks = _as_list(options.pop("link", None))
        errbacks = _as_list(options.pop("link_error", None))
        members = [m.clone() for m in self._members()]
        for callback in callbacks:
            for member in members:
                member.link(maybe_signature(callback, self._app))
        for errback in errbacks:
            for member in members:
                member.link_error(maybe_signature(errback, self._app))
        results = []
        for index, member in enumerate(members):
            results.append(member.apply_async(
                args, kwargs, group_id=member_gid, chord=chord_body,
                group_index=index if group_index is None else group_index, **options))
        return GroupResult(gid, results, app=self.app)

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Run every member here and now; returns a :class:`GroupResult` of eager results."""
        from celeriac.result import GroupResult

        gid = options.pop("task_id", None) or str(uuid.uuid4())
        return GroupResult(gid, [m.apply(args, kwargs) for m in self._members()], app=self.app)


class chord(Signature):
    """``chord(header, body)``: run the header group, then ``body`` with the list of results.

    Links set on the chord go to its body: ``link_error`` runs once whether a header member
    or the body fails (header members also get it with ``task_allow_error_cb_on_chord_header``).
    """

    subtask_type_name = "chord"

    def __init__(self, header: Any = None, body: Any = None, app: Celeriac | None = None,
                 **options: Any) -> None:
        if isinstance(header, dict) and header.get("subtask_type") == "chord" and body is None:
            super().__init__(header, app=app)
            kw = self.kwargs
            header_data = kw["header"]
            if isinstance(header_data, dict) and header_data.get("subtask_type") == "group":
                header_options = dict(header_data.get("options") or {})
            else:  # a plain list: the chord's id names the header group (as Celery reads it)
                header_options = {"task_id": self.options["task_id"]} \
                    if self.options.get("task_id") else {}
            kw["header"] = group(*[maybe_signature(t, self._app) for t in _header_tasks(header_data)],
                                 app=self._app, **header_options)
            kw["body"] = maybe_signature(kw["body"], self._app) if kw.get("body") else None
            return
        header_group = header if isinstance(header, group) else group(*list(header or []), app=app)
        app = app or header_group._app or getattr(body, "_app", None)
        super().__init__("celery.chord", (), {
            "kwargs": {}, "header": header_group,
            "body": maybe_signature(body, app) if body is not None else None,
        }, options, app=app)

    @classmethod
    def from_dict(cls, data: dict[str, Any], app: Celeriac | None = None) -> Signature:
        return cls(data, app=app)

    @property
    def header(self) -> group:
        """The group that runs first."""
        return self.kwargs["header"]  # type: ignore[no-any-return]

    @property
    def body(self) -> Signature | None:
        """The callback that receives the header's results."""
        return self.kwargs.get("body")

    @property
    def tasks(self) -> list[Signature]:
        """The header's members."""
        return self.header.tasks

    def clone(self, args: Any = None, kwargs: Any = None, **options: Any) -> Signature:
        """A copy (header and body copied too)."""
        copied = super().clone(args, kwargs, **options)
        assert isinstance(copied, chord)
        copied.kwargs["header"] = self.header.clone()
        if self.body is not None:
            copied.kwargs["body"] = self.body.clone()
        return copied

    def link(self, callback: Signature) -> Signature:
        """Call ``callback`` with the body's result (links go to the body)."""
        if self.body is None:
            return self._append_option("link", callback)  # type: ignore[no-any-return]
        return self.body.link(callback)

    def link_error(self, errback: Signature) -> Signature:
        """Call ``errback`` once when the chord fails (a header member or the body)."""
        errback = maybe_signature(errback, self._app)
        if self.app.conf.get("task_allow_error_cb_on_chord_header", False):
            for member in self.header.tasks:
                maybe_signature(member, self._app).link_error(errback.clone())
        # A chord nested in the header links the errback to its own body too (as Celery).
        for member in self.header.tasks:
            if isinstance(member, chord):
                member.link_error(errback)
        if self.body is None:
            return self._append_option("link_error", errback)  # type: ignore[no-any-return]
        return self.body.link_error(errback)

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        if (isinstance(other, Signature) and not isinstance(other, (group, _chain))
                and self.body is not None):
            extended = self.clone()
            assert isinstance(extended, chord)
            extended.kwargs["body"] = extended.body | other  # type: ignore[operator]
            return extended
        return super().__or__(other)

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def __call__(self, body: Any = None, **options: Any) -> Any:
        """``chord(header)(body)`` sends the chord with ``body`` as its callback."""
        if body is not None and isinstance(body, Signature):
            return chord(self.header, body, app=self._app, **self.options).apply_async(**options)
        return self.apply_async((body,) if body is not None else None, **options)

    def freeze(self, _id: str | None = None, group_id: str | None = None, chord: Any = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Assign the body's id (the chord's result) and the header's ids."""
        body = self.body
        if body is None:
            raise ValueError("A chord needs a body before it can be sent.")
        body = self.kwargs["body"] = _expand(body)
        result = body.freeze(_id, group_id=group_id, chord=chord,
                             group_index=group_index, root_id=root_id)
        gid = self.header.options.get("task_id") or str(uuid.uuid4())
        self.header.options["task_id"] = gid
        header_result = self.header.freeze(gid, root_id=root_id)
        _attach_parent(result, header_result)
        # As Celery: a frozen chord's own id is its header's group id (a Celery worker that
        # reads the chord with a plain list as header uses it as the group id).
        self.options["task_id"] = gid
        return result

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Send the header with the body embedded; return the body's result."""
        from celeriac.result import AsyncResult, GroupResult

        if self.app.conf.get("task_always_eager"):
            return self.apply(args, kwargs, **options)
        body = (kwargs or {}).get("body") or self.body
        if body is None:
            raise ValueError("A chord needs a body: chord(header, body) or chord(header)(body).")
        backend = self.app.backend
        if backend is None:
            raise ImproperlyConfigured(
                "Chords need a result backend to join the header's results. Configure one, "
                "e.g. Celeriac(..., backend='sqlite:///results.db') or 'redis://localhost:6379/0'."
            )
        if options.get("link") is not None or options.get("link_error") is not None:
            raise TypeError("Cannot add links to a chord when sending it: use chord.link() or "
                            "chord.link_error(), which go to the body (as Celery).")
        options = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        args = self._partial_args(args)
        body = _expand(maybe_signature(body, self._app).clone())
        body_id = body.id or options.pop("task_id", None)
        options.pop("task_id", None)
        for callback in _as_list(options.pop("link", None)):
            body.link(maybe_signature(callback, self._app))
        for errback in _as_list(options.pop("link_error", None)):
            body.link_error(maybe_signature(errback, self._app))
        chain_rest = options.pop("chain", None)
        if chain_rest:
            rest = [maybe_signature(s, self._app) for s in reversed(chain_rest)]
            body = _chain(body, *rest, app=self._app)
        group_id = options.pop("group_id", None)
        group_index = options.pop("group_index", None)
        outer_body = options.pop("chord", None)
        for key in ("queue", "priority", "routing_key", "exchange", "root_id", "parent_id"):
            if key in options:
                body.options.setdefault(key, options[key])
        body_result = body.freeze(body_id, group_id=group_id, chord=outer_body,
                                  group_index=group_index, root_id=options.get("root_id"))
        header = self.header
        gid = header.options.get("task_id") or str(uuid.uuid4())
        members = header._members()
        if not members:
            body.apply_async(([],))
            return body_result
        backend.set_chord_size(gid, sum(chord_size(m, self._app) for m in members))
        _save_header_shape(backend, gid, members, dict(body), options.get("root_id"), self.app)
        header_result = group(*members, app=self._app).apply_async(
            args, (kwargs and {k: v for k, v in kwargs.items() if k != "body"}) or None,
            task_id=gid, chord=dict(body), **options)
        assert isinstance(header_result, GroupResult)
        if isinstance(body_result, (AsyncResult, GroupResult)):
            # As Celery: the body's handle hangs under the header (a body that is itself a
            # chord or chain keeps only this link).
            body_result.parent = header_result
        return body_result

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Run the header then the body here and now."""
        header = self.header.apply(args, kwargs)
        if self.body is None:
            return header
        return self.body.apply((header.get(),))


def _save_header_shape(backend: Any, gid: str, members: list[Signature], body: dict[str, Any],
                       root_id: str | None, app: Celeriac) -> None:
    """Freeze the header members; when one of them is a group of results (a chain ending in a
    group, a chord with a group body) save the header's result tree, so the join gives the body
    a list for that member, as Celery does (it saves the same GroupResult under the group id)."""
    from celeriac.backends.base import GROUPS
    from celeriac.result import GroupResult, ResultSet

    if not backend.has(GROUPS) or any(isinstance(m, chunks) for m in members):
        return
    results = [m.freeze(group_id=gid, chord=body, group_index=i, root_id=root_id)
               for i, m in enumerate(members)]
    if any(isinstance(r, ResultSet) for r in results):
        backend.save_group(gid, GroupResult(gid, results, app=app).as_tuple())


def _header_tasks(header: Any) -> list[Any]:
    if isinstance(header, dict) and header.get("subtask_type") == "group":
        return list(header["kwargs"]["tasks"])
    return list(header)


class xmap(Signature):
    """Call one task for each item of ``it``, as a single task (``task.map(it)``)."""

    subtask_type_name = "xmap"
    builtin_name = "celery.map"

    def __init__(self, task: Any, it: Any = None, app: Celeriac | None = None, **options: Any) -> None:
        if isinstance(task, dict) and it is None and (
                task.get("subtask_type") == self.subtask_type_name
                or task.get("task") == self.builtin_name):
            super().__init__(task, app=app)
            return
        sig = maybe_signature(task, app)
        super().__init__(self.builtin_name, (), {"task": sig, "it": list(it or [])}, options,
                         immutable=True, app=app or sig._app)
        # On the wire it is a plain task signature, as Celery sends it (a worker of either
        # kind runs it as the builtin task, keeping its options).
        self["subtask_type"] = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], app: Celeriac | None = None) -> Signature:
        return cls(data, app=app)

    def __repr__(self) -> str:
        task = self.kwargs["task"]
        name = task.get("task") if isinstance(task, dict) else task
        return f"[{name}(x) for x in {self.kwargs['it']!r}]"


class xstarmap(xmap):
    """Like :class:`xmap` with each item unpacked as positional arguments."""

    subtask_type_name = "xstarmap"
    builtin_name = "celery.starmap"

    def __repr__(self) -> str:
        task = self.kwargs["task"]
        name = task.get("task") if isinstance(task, dict) else task
        return f"[{name}(*x) for x in {self.kwargs['it']!r}]"


class chunks(Signature):
    """Split ``it`` into chunks of ``n`` argument tuples; each chunk is one ``xstarmap`` task."""

    subtask_type_name = "chunks"

    def __init__(self, task: Any, it: Any = None, n: int | None = None, app: Celeriac | None = None,
                 **options: Any) -> None:
        if isinstance(task, dict) and it is None and (
                task.get("subtask_type") == "chunks" or task.get("task") == "celery.chunks"):
            super().__init__(task, app=app)
            return
        sig = maybe_signature(task, app)
        super().__init__("celery.chunks", (), {"task": sig, "it": [list(x) for x in it or []],
                                                "n": int(n or 1)}, options, immutable=True,
                         app=app or sig._app)
        self["subtask_type"] = None  # as Celery sends it

    @classmethod
    def from_dict(cls, data: dict[str, Any], app: Celeriac | None = None) -> Signature:
        return cls(data, app=app)

    def group(self) -> group:
        """The chunks as a group of ``xstarmap`` tasks."""
        task = maybe_signature(self.kwargs["task"], self._app)
        items = iter(self.kwargs["it"])
        size = self.kwargs["n"]
        parts = []
        while True:
            chunk = list(itertools.islice(items, size))
            if not chunk:
                break
            parts.append(xstarmap(task, chunk, app=self._app))
        return group(*parts, app=self._app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async()

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        return self.group().apply_async(args, kwargs, **options)

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        return self.group().apply(args, kwargs, **options)
