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
    from celeriac.result import AsyncResult, GroupResult

__all__ = [
    "Signature",
    "chain",
    "chord",
    "chunks",
    "group",
    "maybe_signature",
    "signature",
    "xmap",
    "xstarmap",
]

# Options that describe where a task sits in a workflow and only belong to one message.
_WORKFLOW_OPTIONS = ("chord", "group_id", "group_index")


def _default_app() -> Celeriac:
    from celeriac.app import _apps

    if not _apps:
        raise ImproperlyConfigured("No Celeriac app exists yet; create one before using signatures.")
    return _apps[-1]


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

    def clone(self, args: Any = None, kwargs: Any = None, **options: Any) -> Signature:
        """A copy with ``args`` prepended, ``kwargs`` merged and ``options`` laid over."""
        new_args, new_kwargs, new_options = self._merge(args, kwargs, options)
        data = dict(self)
        data.update(args=list(new_args), kwargs=new_kwargs, options=new_options)
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

    def link(self, callback: Signature) -> Signature:
        """Call ``callback`` with this task's result when it succeeds; return ``callback``."""
        self.options.setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback: Signature) -> Signature:
        """Call ``errback`` with the failed task's id when it fails; return ``errback``."""
        self.options.setdefault("link_error", []).append(errback)
        return errback

    def freeze(self, _id: str | None = None, group_id: str | None = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> AsyncResult:
        """Assign the task id now (and workflow ids when given); return its result handle."""
        from celeriac.result import AsyncResult

        opts = self.options
        task_id = opts.get("task_id") or _id or str(uuid.uuid4())
        opts["task_id"] = task_id
        # Results of later steps go to the caller's reply queue (rpc://), as Celery does.
        opts.setdefault("reply_to", self.app.thread_oid)
        for key, value in (("group_id", group_id), ("root_id", root_id),
                           ("parent_id", parent_id), ("group_index", group_index)):
            if value is not None and not opts.get(key):
                opts[key] = value
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
            return _chain(self, *other.tasks, app=self._app)
        if isinstance(other, Signature):
            return _chain(self, other, app=self._app)
        return NotImplemented

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


def _flatten_tasks(tasks: Iterable[Any], app: Celeriac | None) -> list[Signature]:
    result: list[Signature] = []
    for task in tasks:
        sig = maybe_signature(task, app)
        if isinstance(sig, _chain):
            result.extend(sig.tasks)
        else:
            result.append(sig)
    return result


class _chain(Signature):
    """Tasks run one after the other, each receiving the previous result."""

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
        super().__init__("celery.chain", (), {"tasks": _flatten_tasks(tasks, app)}, options,
                         app=app)

    @classmethod
    def from_dict(cls, data: dict[str, Any], app: Celeriac | None = None) -> Signature:
        return cls(data, app=app)

    @property
    def tasks(self) -> list[Signature]:
        """The steps."""
        return self.kwargs["tasks"]  # type: ignore[no-any-return]

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        if isinstance(other, _chain):
            return _chain(*self.tasks, *other.tasks, app=self._app)
        if isinstance(other, Signature):
            return _chain(*self.tasks, other, app=self._app)
        return NotImplemented

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks) if self.tasks else "chain()"

    def _prepared_steps(self) -> list[Signature]:
        steps = [t.clone() for t in self.tasks]
        index = 0
        while index < len(steps) - 1:
            step = steps[index]
            if isinstance(step, group):
                steps[index] = chord(step, body=steps.pop(index + 1), app=self._app)
            index += 1
        return steps

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def freeze(self, _id: str | None = None, group_id: str | None = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> AsyncResult:
        steps = self._prepared_steps()
        self.kwargs["tasks"] = steps
        result: Any = None
        for step in steps:
            frozen = step.freeze(root_id=root_id)
            if result is not None:
                frozen.parent = result
            result = frozen
        return result  # type: ignore[no-any-return]

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if self.app.conf.get("task_always_eager"):
            return self.apply(args, kwargs, **options)
        steps = self._prepared_steps()
        if not steps:
            raise ValueError("Cannot send an empty chain.")
        options = {**self.options, **options}
        tail_options = {k: options.pop(k) for k in _WORKFLOW_OPTIONS if k in options}
        inherited_chain = options.pop("chain", None) or []
        if tail_options:
            steps[-1] = steps[-1].clone(**tail_options)
        results: list[Any] = []
        for step in steps:
            frozen = step.freeze()
            if results:
                frozen.parent = results[-1]
            results.append(frozen)
        remaining = [dict(s) for s in reversed(steps[1:])]
        first = steps[0]
        first.apply_async(args, kwargs, chain=list(inherited_chain) + remaining or None, **options)
        return results[-1]

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        result: Any = None
        for index, step in enumerate(self._prepared_steps()):
            if index == 0:
                result = step.apply(args, kwargs, **options)
            else:
                previous = result.get()
                result = step.apply((previous,))
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
            if isinstance(task, group):
                flat.extend(task._members())
            else:
                flat.append(task)
        return flat

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        if isinstance(other, Signature) and not isinstance(other, group):
            return chord(self, body=other, app=self._app)
        return super().__or__(other)

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def freeze(  # type: ignore[override]
        self, _id: str | None = None, group_id: str | None = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> GroupResult:
        from celeriac.result import GroupResult

        gid = self.options.get("task_id") or _id or str(uuid.uuid4())
        self.options["task_id"] = gid
        results = [m.freeze(group_id=gid, group_index=i) for i, m in enumerate(self._members())]
        return GroupResult(gid, results, app=self.app)

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        from celeriac.result import GroupResult

        if self.app.conf.get("task_always_eager"):
            return self.apply(args, kwargs, **options)
        options = {**self.options, **options}
        gid = options.pop("task_id", None) or options.pop("group_id", None) or str(uuid.uuid4())
        options.pop("group_id", None)
        options.pop("group_index", None)
        chord_body = options.pop("chord", None)
        members = self._members()
        if chord_body is not None and self.app.backend is not None:
            self.app.backend.set_chord_size(gid, len(members))
        results = []
        for index, member in enumerate(members):
            results.append(member.apply_async(args, kwargs, group_id=gid, group_index=index,
                                              chord=chord_body, **options))
        return GroupResult(gid, results, app=self.app)

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        from celeriac.result import GroupResult

        gid = options.pop("task_id", None) or str(uuid.uuid4())
        return GroupResult(gid, [m.apply(args, kwargs) for m in self._members()], app=self.app)


class chord(Signature):
    """``chord(header, body)``: run the header group, then ``body`` with the list of results."""

    subtask_type_name = "chord"

    def __init__(self, header: Any = None, body: Any = None, app: Celeriac | None = None,
                 **options: Any) -> None:
        if isinstance(header, dict) and header.get("subtask_type") == "chord" and body is None:
            super().__init__(header, app=app)
            kw = self.kwargs
            kw["header"] = group(*[maybe_signature(t, self._app) for t in _header_tasks(kw["header"])],
                                 app=self._app)
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

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def __call__(self, body: Any = None, **options: Any) -> Any:
        """``chord(header)(body)`` sends the chord with ``body`` as its callback."""
        if body is not None and isinstance(body, Signature):
            return chord(self.header, body, app=self._app, **self.options).apply_async(**options)
        return self.apply_async((body,) if body is not None else None, **options)

    def freeze(self, _id: str | None = None, group_id: str | None = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> AsyncResult:
        if self.body is None:
            raise ValueError("A chord needs a body before it can be sent.")
        result = self.body.freeze(_id, root_id=root_id)
        self.options["task_id"] = result.id
        return result

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        from celeriac.result import GroupResult

        if self.app.conf.get("task_always_eager"):
            return self.apply(args, kwargs, **options)
        body = self.body
        if body is None:
            raise ValueError("A chord needs a body: chord(header, body) or chord(header)(body).")
        backend = self.app.backend
        if backend is None:
            raise ImproperlyConfigured(
                "Chords need a result backend to join the header's results. Configure one, "
                "e.g. Celeriac(..., backend='sqlite:///results.db') or 'redis://localhost:6379/0'."
            )
        options = {**self.options, **options}
        body = body.clone()
        body_id = body.options.get("task_id") or options.pop("task_id", None) or str(uuid.uuid4())
        options.pop("task_id", None)
        gid = str(uuid.uuid4())
        body.options["task_id"] = body_id
        body.options.setdefault("group_id", gid)
        body.options.setdefault("reply_to", self.app.thread_oid)
        chain_rest = options.pop("chain", None)
        if chain_rest:
            body.options["chain"] = list(body.options.get("chain") or []) + list(chain_rest)
        for key in _WORKFLOW_OPTIONS:
            value = options.pop(key, None)
            if value is not None and key != "group_id":
                body.options[key] = value
        members = self.header._members()
        from celeriac.result import AsyncResult

        if not members:
            body.apply_async(([],))
            return AsyncResult(body_id, app=self.app, task_name=body.name)
        header_result = group(*members, app=self._app).apply_async(
            args, kwargs, task_id=gid, chord=dict(body), **options)
        assert isinstance(header_result, GroupResult)
        return AsyncResult(body_id, app=self.app, task_name=body.name, parent=header_result)

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        header = self.header.apply(args, kwargs)
        if self.body is None:
            return header
        return self.body.apply((header.get(),))


def _header_tasks(header: Any) -> list[Any]:
    if isinstance(header, dict) and header.get("subtask_type") == "group":
        return list(header["kwargs"]["tasks"])
    return list(header)


class xmap(Signature):
    """Call one task for each item of ``it``, as a single task (``task.map(it)``)."""

    subtask_type_name = "xmap"
    builtin_name = "celery.map"

    def __init__(self, task: Any, it: Any = None, app: Celeriac | None = None, **options: Any) -> None:
        if isinstance(task, dict) and task.get("subtask_type") == self.subtask_type_name and it is None:
            super().__init__(task, app=app)
            return
        sig = maybe_signature(task, app)
        super().__init__(self.builtin_name, (), {"task": sig, "it": list(it or [])}, options,
                         app=app or sig._app)

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
        if isinstance(task, dict) and task.get("subtask_type") == "chunks" and it is None:
            super().__init__(task, app=app)
            return
        sig = maybe_signature(task, app)
        super().__init__("celery.chunks", (), {"task": sig, "it": [list(x) for x in it or []],
                                                "n": int(n or 1)}, options, app=app or sig._app)

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
