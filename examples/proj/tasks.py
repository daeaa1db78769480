"""The seed's tasks, plus two that show STARTED and RETRY states."""

import time

from .celery import app


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def xsum(numbers):
    return sum(numbers)


@app.task(track_started=True)
def slow_add(x, y, delay=1.0):
    """Sleeps first, so its STARTED state can be seen."""
    time.sleep(delay)
    return x + y


@app.task(bind=True, max_retries=3, default_retry_delay=0.2)
def flaky(self, succeed_on=2):
    """Fails until its retry number reaches ``succeed_on``, retrying itself."""
    if self.request.retries < succeed_on:
        raise self.retry(exc=RuntimeError(f"attempt {self.request.retries} failed"))
    return f"succeeded after {self.request.retries} retries"
