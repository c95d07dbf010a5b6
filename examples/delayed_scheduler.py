"""A delayed task scheduler on mqs.Broker: run a task now or later.

An application schedules a welcome email to go out now and a cleanup job
for an hour later; a worker loop runs each task when it is due. A task
that raises is retried with exponential backoff and dead-lettered after
three attempts.

    python examples/delayed_scheduler.py                 # cleanup in 1 h
    python examples/delayed_scheduler.py --cleanup-delay 2 --run-for 4
"""

import argparse
import logging
import math
import time

import mqs

log = logging.getLogger("scheduler")


def send_email(payload):
    log.info("email to %s: %s", payload["to"], payload["subject"])


def cleanup(payload):
    log.info("cleanup of %s", payload["path"])


TASKS = {"send_email": send_email, "cleanup": cleanup}


def schedule(broker, task, payload, delay=None):
    """Publish `task` to run after `delay` seconds (None: now)."""
    return broker.publish("tasks", {"task": task, "payload": payload},
                          delay=delay)


def worker(broker, run_for):
    """Run due tasks for `run_for` seconds; return the names run, in order."""
    done = []
    consumer = broker.consume("tasks", "workers", ack_timeout=60)
    deadline = time.monotonic() + run_for
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = consumer.get(timeout=left)
        except mqs.Empty:
            break
        job = message.body
        try:
            TASKS[job["task"]](job["payload"])
        except Exception as exc:
            log.warning("task %s failed (attempt %d): %s", job["task"],
                        message.attempts, exc)
            message.nack(error=exc)
            continue
        message.ack()
        done.append(job["task"])
    consumer.close()
    return done


def seconds(text):
    """Parse a finite command-line number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid number {text!r}; give seconds such as 2 or 0.5"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds, 0 or more, got {text!r}")
    return value


def delay_seconds(text):
    """Parse a delay that a publish accepts: 0 to mqs.MAX_DELAY_SECONDS."""
    value = seconds(text)
    if value > mqs.MAX_DELAY_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be at most {mqs.MAX_DELAY_SECONDS:.0f} seconds "
            f"(mqs.MAX_DELAY_SECONDS, 10 years), got {text!r}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cleanup-delay", type=delay_seconds,
                        default=3600.0,
                        help="seconds until the cleanup job runs, 0 to "
                             "315576000 (10 years)")
    parser.add_argument("--run-for", type=seconds, default=5.0,
                        help="seconds the worker loop runs (0 or more)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    broker = mqs.Broker()
    broker.declare_topic("tasks", max_attempts=3,
                         retry=mqs.Backoff(base=0.5, factor=2, max=60))
    schedule(broker, "send_email",
             {"to": "ada@example.com", "subject": "Welcome"})
    schedule(broker, "cleanup", {"path": "/tmp/uploads"},
             delay=args.cleanup_delay)

    done = worker(broker, args.run_for)
    stats = broker.stats("tasks")
    print(f"ran: {done}")
    print(f"still delayed: {stats['delayed']}")
    return done


if __name__ == "__main__":
    main()
