"""Running one request: the task body, its result, retries, and advancing the canvas.

:class:`Tracer.run` is what a pool executes. It never raises: every outcome becomes a stored
state (unless results are ignored) and an ack or reject of the message.
"""

from __future__ import annotations

import logging
import time
import traceback as tb
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.backends.base import (
    GROUPS,
    ResultBackend,
    decode_exception,
    encode_exception,
    make_meta,
)
from celeriac.canvas import Signature, final_signatures, group, maybe_signature
from celeriac.exceptions import ChordError, Ignore, Reject, Retry, TaskRevokedError, Terminated
from celeriac.plugins.manager import lifecycle
from celeriac.task import Context, pop_request, push_request

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.broker.base import Consumer
    from celeriac.events import EventDispatcher
    from celeriac.worker.request import Request

__all__ = ["Tracer"]

logger = logging.getLogger("celeriac.worker")


class Tracer:
    """Executes requests for one worker: app, result backend, and the consumer to ack on."""

    def __init__(self, app: Celeriac, consumer: Consumer | None, hostname: str) -> None:
        self.app = app
        self.consumer = consumer
        self.hostname = hostname
        self.backend: ResultBackend | None = app.backend
        self.hooks = lifecycle()
        self.revoked: set[str] = set()
        #: The worker's event dispatcher when task events are on, else None.
        self.events: EventDispatcher | None = None
        #: ``result_extended``: stored states also carry the task's name, arguments, worker,
        #: retries and queue (Celery's extended result fields).
        self.extended = bool(app.conf.get("result_extended"))

    # -- acknowledgement ----------------------------------------------------------------------

    def ack(self, request: Request) -> None:
        """Ack the request's message once (an ``acks_late`` one after what the task published
        is confirmed)."""
        if not request.acked:
            if request.acks_late:
                self.flush_published(request)
            request.acked = True
            if self.consumer is None:  # in a pool process: the parent applies the decision
                request.outcome = "ack"
            else:
                self.consumer.ack(request.delivery)

    def reject(self, request: Request, requeue: bool) -> None:
        """Reject the request's message once."""
        if not request.acked:
            request.acked = True
            if self.consumer is None:
                request.outcome = "requeue" if requeue else "reject"
            else:
                self.consumer.reject(request.delivery, requeue=requeue)

    # -- storing ------------------------------------------------------------------------------

    def _keeps_result(self, request: Request, failed: bool = False) -> bool:
        if self.backend is None:
            return False
        task = request.task
        if failed:  # as Celery: only the task's own ignore_result can keep a failure unstored
            return not task.ignore_result or task.store_errors_even_if_ignored
        return not (request.message.headers.get("ignore_result") or task.ignore_result)

    def store(self, request: Request, status: str, result: Any, traceback: str | None = None,
              task_id: str | None = None) -> None:
        """Store a state for the request (or for ``task_id``, e.g. a later chain step)."""
        backend = self.backend
        if backend is None:
            return
        headers = request.message.headers
        tid = task_id or request.id
        extra = self._extended_fields(request) if self.extended and task_id is None else None
        meta = make_meta(tid, status, result, traceback=traceback, group_id=headers.get("group")
                         if task_id is None else None, parent_id=headers.get("parent_id"), extra=extra)
        try:
            backend.store(tid, meta, reply_to=request.message.properties.get("reply_to"),
                          correlation_id=request.message.properties.get("correlation_id") or tid)
        except Exception:
            logger.exception("Could not store the %s state of task %s[%s]", status, request.name, tid)

    def _extended_fields(self, request: Request) -> dict[str, Any]:
        """Celery's ``result_extended`` fields of a stored state: ``name`` (the task's registered
        name), ``args``, ``kwargs``, ``worker`` (node name), ``retries``, ``queue`` (the routing
        key it was delivered with)."""
        message = request.message
        return {"name": message.headers.get("task"), "args": message.args, "kwargs": message.kwargs,
                "worker": self.hostname, "retries": message.headers.get("retries") or 0,
                "queue": request.delivery.routing_key if request.delivery is not None else None}

    # -- the run ------------------------------------------------------------------------------

    def run(self, request: Request) -> Request:
        """Execute ``request`` completely (state, canvas, ack). Never raises."""
        try:
            self._run(request)
        except Terminated as exc:  # revoke(terminate=True) landed outside the task's body
            self.discard(request, "terminated", exc.signum)
        except BaseException as exc:  # the last line of defence: a worker thread must never die
            logger.exception("Internal error while running task %s[%s]", request.name, request.id)
            # A final state whatever the path, so get() does not hang (a stored SUCCESS is kept).
            self.store(request, states.FAILURE, exc, tb.format_exc())
            self.reject(request, requeue=False)
        self.flush_published(request)
        return request

    def flush_published(self, request: Request) -> None:
        """Wait until the broker took what this thread published for ``request`` (results,
        retries, callbacks); a failure is logged with the task id. Never raises."""
        broker = self.app._broker
        if broker is None:
            return
        try:
            broker.flush()
        except Exception as exc:
            logger.error("Messages published by task %s[%s] may not have reached the broker: %s",
                         request.name, request.id, exc)

    def discard(self, request: Request, why: str, signum: int | None = None) -> None:
        """Settle a request that does not run to its end: ``why`` is ``revoked`` or ``expired``
        (it never started) or ``terminated`` (``revoke(terminate=True)`` killed it with
        ``signum``). Stores REVOKED (``TaskRevokedError(why)``), sends ``task-revoked`` and
        acks the message, as Celery does; a chord member counts as a REVOKED part, so the chord's
        body fails with ``ChordError`` instead of waiting forever. Never raises for a failed
        store (it is logged)."""
        if why == "terminated":
            logger.warning("Task %s[%s] terminated (signal %s)", request.name, request.id, signum)
        else:
            logger.warning("Discarding %s task %s[%s]", why, request.name, request.id)
        error = TaskRevokedError(why)
        self.store(request, states.REVOKED, error)
        embed = request.message.embed
        if embed.get("chord"):
            headers = request.message.headers
            self._chord_part(request, headers.get("group"), headers.get("group_index"), request.id,
                             embed["chord"], states.REVOKED, encode_exception(error))
        if self.events is not None:
            self.events.send("task-revoked", uuid=request.id, terminated=why == "terminated",
                             signum=signum, expired=why == "expired")
        self.ack(request)

    def _run(self, request: Request) -> None:
        task = request.task
        if request.id in self.revoked or (request.expires is not None and time.time() > request.expires):
            self.discard(request, "revoked" if request.id in self.revoked else "expired")
            return
        if not request.acks_late:
            self.ack(request)
        message = request.message
        if task.track_started and self._keeps_result(request):
            self.store(request, states.STARTED, {"pid": _pid(), "hostname": self.hostname})
        context = request.context()
        hooks = self.hooks
        request.started_at = time.monotonic()
        if self.events is not None:
            self.events.send("task-started", uuid=request.id)
        push_request(context)
        try:
            if hooks.prerun is not None:
                hooks.prerun(task=task, task_id=request.id, args=message.args, kwargs=message.kwargs)
            if task.bind:
                retval = task.run(task, *message.args, **message.kwargs)
            else:
                retval = task.run(*message.args, **message.kwargs)
        except Retry as exc:
            pop_request()
            self._on_retry(request, exc)
            return
        except Ignore:
            pop_request()
            self.ack(request)
            if hooks.postrun is not None:
                hooks.postrun(task=task, task_id=request.id, state=states.IGNORED, retval=None)
            return
        except Terminated as exc:  # revoke(terminate=True) on a green pool: never retried
            pop_request()
            if hooks.postrun is not None:
                hooks.postrun(task=task, task_id=request.id, state=states.REVOKED, retval=exc)
            self.discard(request, "terminated", exc.signum)
            return
        except Reject as exc:
            pop_request()
            if hooks.postrun is not None:
                hooks.postrun(task=task, task_id=request.id, state=states.REJECTED, retval=exc)
            logger.info("Task %s[%s] rejected itself: %r", request.name, request.id, exc.reason)
            if self.events is not None:
                self.events.send("task-rejected", uuid=request.id, requeue=exc.requeue)
            self.reject(request, requeue=exc.requeue)
            return
        except BaseException as exc:
            pop_request()
            if not isinstance(exc, Exception) and not _is_time_limit(exc):
                raise
            countdown = task._autoretry_countdown(exc, context.retries)
            trace = None
            if countdown is not None:
                push_request(context)
                try:
                    task.retry(exc=exc, countdown=countdown, **task.autoretry_options())
                except Retry as retry_exc:
                    pop_request()
                    self._on_retry(request, retry_exc)
                    return
                except Exception as final:  # no retry left, or the re-send failed: a FAILURE
                    pop_request()
                    if final is not exc:
                        trace = "".join(tb.format_exception(type(final), final, final.__traceback__))
                        exc = final
                except BaseException:
                    pop_request()
                    raise
            trace = trace or tb.format_exc()
            runtime = time.monotonic() - request.started_at
            logger.error("Task %s[%s] raised unexpected: %r (%.4fs)\n%s", request.name, request.id,
                         exc, runtime, trace)
            self._on_failure(request, exc, trace)
            if request.acks_late and not task.acks_on_failure_or_timeout:
                self.reject(request, requeue=False)
            else:
                self.ack(request)
            return
        pop_request()
        self._on_success(request, retval)
        self.ack(request)

    def _on_success(self, request: Request, retval: Any) -> None:
        # Celery's order: the next steps are sent, then the result is stored (a waiting client
        # gets it as early as possible), then the log line and the event.
        runtime = time.monotonic() - request.started_at
        embed = request.message.embed
        headers = request.message.headers
        links = {"parent_id": request.id, "root_id": headers.get("root_id") or request.id}
        try:
            for callback in embed.get("callbacks") or ():
                maybe_signature(callback, self.app).apply_async((retval,), **links)
            chain = embed.get("chain")
            if chain:
                remaining = list(chain)
                step = maybe_signature(remaining.pop(), self.app)
                step.apply_async((retval,), chain=remaining or None, **links)
        except Exception as exc:
            logger.exception("Task %s[%s] succeeded but its next step could not be sent",
                             request.name, request.id)
            self.store(request, states.FAILURE, exc, tb.format_exc())
            return
        if self._keeps_result(request) or embed.get("chord"):
            self.store(request, states.SUCCESS, retval)
        if embed.get("chord"):
            self._chord_part(request, headers.get("group"), headers.get("group_index"), request.id,
                             embed["chord"], states.SUCCESS, retval)
        if logger.isEnabledFor(logging.INFO):
            logger.info("Task %s[%s] succeeded in %.6fs: %r", request.name, request.id, runtime, retval)
        if self.events is not None:
            self.events.send("task-succeeded", uuid=request.id, result=repr(retval)[:1024], runtime=runtime)
        task = request.task
        task.on_success(retval, request.id, request.message.args, request.message.kwargs)
        if self.hooks.success is not None:
            self.hooks.success(task=task, task_id=request.id, result=retval)
        if self.hooks.postrun is not None:
            self.hooks.postrun(task=task, task_id=request.id, state=states.SUCCESS, retval=retval)

    def _on_failure(self, request: Request, exc: BaseException, trace: str) -> None:
        embed = request.message.embed
        headers = request.message.headers
        if self.events is not None:
            self.events.send("task-failed", uuid=request.id, exception=repr(exc), traceback=trace)
        if self._keeps_result(request, failed=True) or embed.get("chord") or embed.get("chain"):
            self.store(request, states.FAILURE, exc, trace)
        if embed.get("chord"):
            self._chord_part(request, headers.get("group"), headers.get("group_index"), request.id,
                             embed["chord"], states.FAILURE, encode_exception(exc))
        # Waiting clients hold the ids of the later chain steps (and of what those contain:
        # group members, chord bodies): fail them too, and report those that are chord members,
        # or their chords would wait forever.
        for step in embed.get("chain") or ():
            self._fail_unrun(request, step, exc, trace)
        self._call_errbacks(request, embed.get("errbacks"), request.context(), exc, trace)
        task = request.task
        task.on_failure(exc, request.id, request.message.args, request.message.kwargs, trace)
        if self.hooks.failure is not None:
            self.hooks.failure(task=task, task_id=request.id, exc=exc, traceback=trace)
        if self.hooks.postrun is not None:
            self.hooks.postrun(task=task, task_id=request.id, state=states.FAILURE, retval=exc)

    def _on_retry(self, request: Request, exc: Retry) -> None:
        logger.info("Task %s[%s] retry: %s", request.name, request.id, exc)
        if self.events is not None:
            self.events.send("task-retried", uuid=request.id, exception=repr(exc.exc or exc), traceback=None)
        if self._keeps_result(request):
            self.store(request, states.RETRY, exc.exc if exc.exc is not None else exc)
        send, exc.send = exc.send, None
        if send is not None:
            try:
                send()
            except Exception as error:  # the re-send failed: a FAILURE, as when retry() raised it
                trace = "".join(tb.format_exception(type(error), error, error.__traceback__))
                logger.error("Task %s[%s] could not be retried: %r", request.name, request.id, error)
                self._on_failure(request, error, trace)
                self.ack(request)
                return
        request.task.on_retry(exc.exc or exc, request.id, request.message.args,
                              request.message.kwargs, None)
        if self.hooks.retry is not None:
            self.hooks.retry(task=request.task, task_id=request.id, reason=exc.exc)
        if self.hooks.postrun is not None:
            self.hooks.postrun(task=request.task, task_id=request.id, state=states.RETRY, retval=exc)
        self.ack(request)

    def _call_errbacks(self, request: Request, errbacks: Any, failed: Context,
                       exc: BaseException, trace: str | None) -> None:
        """Run the error callbacks of the failed task ``failed``, as Celery does: an errback
        whose task takes more than one positional argument is called here with
        ``(request, exc, traceback)``; the others are sent with the failed task's id."""
        for data in errbacks or ():
            try:
                errback = maybe_signature(data, self.app)
                if _takes_request(self.app.tasks.get(errback.name)):
                    errback(failed, exc, trace)
                else:
                    errback.apply_async((failed.id,), parent_id=failed.id,
                                        root_id=failed.root_id or failed.id)
            except Exception:
                logger.exception("The errback of task %s[%s] failed", failed.task, failed.id)

    def _chord_part(self, request: Request, group_id: str | None, group_index: int | None,
                    task_id: str, body_data: Any, state: str, result: Any) -> None:
        """Record one finished member of chord ``group_id``; the member that completes it
        sends the body (or fails it when a member failed)."""
        if not group_id or not body_data or self.backend is None:
            return
        try:
            entries = self.backend.chord_part_return(group_id, group_index, task_id, state, result)
        except Exception:
            logger.exception("Chord %s: could not record member %s", group_id, task_id)
            return
        if entries is None:
            return
        body = maybe_signature(body_data, self.app)
        failed = [(tid, st, res) for tid, st, res in entries if st in states.PROPAGATE_STATES]
        if failed:
            tid, _, res = failed[0]
            cause = decode_exception(res)
            error = ChordError(f"Dependency {tid} raised {cause!r}")
            error.__cause__ = cause
            self._fail_chord_body(request, body, error)
            return
        try:
            # As Celery: the member that completed the chord is the body's parent.
            headers = request.message.headers
            body.apply_async((self._chord_values(group_id, entries),), parent_id=task_id,
                             root_id=headers.get("root_id") or request.id)
        except Exception as exc:
            logger.exception("Chord %s: could not send the body", group_id)
            self._fail_chord_body(request, body, ChordError(f"Callback error: {exc!r}"))

    def _chord_values(self, group_id: str, entries: list[Any]) -> list[Any]:
        """The header's results for the body: in header order, and shaped like the header's
        saved result tree when there is one (a member that is a group of results gives a
        list)."""
        flat = [res for _, _, res in entries]
        backend = self.backend
        if backend is None or not backend.has(GROUPS):
            return flat
        try:
            saved = backend.restore_group(group_id)
        except Exception:
            logger.exception("Chord %s: could not read the saved header", group_id)
            return flat
        if not saved:
            return flat
        by_id = {tid: res for tid, _, res in entries}

        def shape(node: Any) -> Any:
            (task_id, _parent), members = node
            if members is None:
                return by_id[task_id]
            return [shape(m) for m in members]

        try:
            return shape(saved)  # type: ignore[no-any-return]
        except (KeyError, TypeError, ValueError):
            return flat

    def _fail_unrun(self, request: Request, sig: Any, exc: BaseException,
                    trace: str | None) -> list[Signature]:
        """Store ``exc`` for every result that ``sig`` (which will never run) stands for, and
        report those that are chord members; return their signatures."""
        try:
            finals = final_signatures(sig, self.app)
        except Exception:
            logger.exception("Cannot fail the unrun step %r of task %s[%s]", sig, request.name,
                             request.id)
            return []
        for final in finals:
            options = final.options
            task_id = options.get("task_id")
            if not task_id:
                continue
            self.store(request, states.FAILURE, exc, trace, task_id=task_id)
            if options.get("chord") and options.get("group_id"):
                self._chord_part(request, options["group_id"], options.get("group_index"), task_id,
                                 options["chord"], states.FAILURE, encode_exception(exc))
        return finals

    def _fail_chord_body(self, request: Request, body: Signature, error: BaseException) -> None:
        """Fail a chord's body that will not run: store the error where its caller waits, run
        its error callbacks, and report it to an enclosing chord."""
        errbacks = body.options.get("link_error")
        logger.error("Chord body %s[%s] failed: %s", body.name, body.id, error)
        if isinstance(body, group):
            # As Celery: each member of a group body fails with the header's own exception
            # and the group's errbacks run once per member.
            error = error.__cause__ if isinstance(error.__cause__, BaseException) else error
            targets = self._fail_unrun(request, body, error, None)
        else:
            finals = self._fail_unrun(request, body, error, None)
            targets = [body] if body.id or not finals else finals[:1]
        for target in targets:
            options = target.options
            fake = Context(id=target.id, task=target.name, args=list(target.args),
                           kwargs=dict(target.kwargs), root_id=options.get("root_id"),
                           group=options.get("group_id"), errbacks=errbacks,
                           is_eager=False, delivery_info={})
            self._call_errbacks(request, errbacks, fake, error, None)


def _takes_request(task: Any) -> bool:
    """True when an errback task takes ``(request, exc, traceback)`` (more than one positional
    parameter, or ``*args``), the test Celery applies."""
    if task is None:
        return False
    import inspect

    try:
        params = list(inspect.signature(task.run).parameters.values())
    except (TypeError, ValueError):
        return False
    if getattr(task, "bind", False):
        params = params[1:]
    positional = [p for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return any(p.kind == p.VAR_POSITIONAL for p in positional) or len(positional) > 1


def _is_time_limit(exc: BaseException) -> bool:
    from celeriac.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

    return isinstance(exc, (SoftTimeLimitExceeded, TimeLimitExceeded))


def _pid() -> int:
    import os

    return os.getpid()


# -- process pools ------------------------------------------------------------------------------

_child_tracer: Tracer | None = None
_child_dispatcher: Any = None


def init_process(app: Celeriac, hostname: str, events: bool) -> None:
    """Prepare a pool process (after fork) to run :func:`run_payload`."""
    global _child_tracer
    _child_tracer = Tracer(app, None, hostname)
    if events:
        from celeriac.events import EventDispatcher

        _child_tracer.events = EventDispatcher(app.broker, hostname)


def set_process_events(enabled: bool) -> None:
    """Turn task events on or off in this pool process (``control enable_events`` /
    ``disable_events`` after it started). No-op before :func:`init_process`."""
    global _child_dispatcher
    tracer = _child_tracer
    if tracer is None:
        return
    if not enabled:
        tracer.events = None
        return
    if tracer.events is None:
        if _child_dispatcher is None:
            from celeriac.events import EventDispatcher

            _child_dispatcher = EventDispatcher(tracer.app.broker, tracer.hostname)
        tracer.events = _child_dispatcher


def run_payload(payload: dict[str, Any]) -> str:
    """Run one request in a pool process; return the ack decision for the parent.

    ``payload`` is :meth:`Request.to_payload` (plain data). The answer is ``ack``, ``reject``
    or ``requeue``.
    """
    from celeriac.worker.request import Request

    tracer = _child_tracer
    if tracer is None:
        raise RuntimeError("init_process() was not called in this pool process.")
    request = Request.from_payload(tracer.app, payload)
    tracer.run(request)
    return request.outcome or "ack"
