"""Polling helpers of the Slurm tests (imported by name: pytest puts this folder on sys.path)."""
import time

import pytest


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def wait_state(store, run, states, timeout=120):
    def check():
        status = store.read_status(run) or {}
        return status if status.get("state") in states else None
    return wait_until(check, timeout, f"{run} to be {states} (now {(store.read_status(run) or {}).get('state')})")
