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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cleanup-delay", type=float, default=3600.0,
                        help="seconds until the cleanup job runs")
    parser.add_argument("--run-for", type=float, default=5.0,
                        help="seconds the worker loop runs")
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
