"""A priority task manager on mqs.Broker with several worker threads.

Critical alerts go out before routine reports, and cleanup runs last
(strict priority). A worker that fails a task nacks it: the task goes
back to the tail of its priority lane for another worker to retry, and
after three failures it lands in the dead-letter queue.

    python examples/priority_tasks.py --workers 3
"""

import argparse
import collections
import threading

import mqs

PRIORITY = {"critical_alert": 9, "report": 5, "cleanup": 0}


def worker(consumer, flaky, results, lock):
    """Take tasks until the consumer is closed; record what ran."""
    for message in consumer:
        task = message.body
        if task["name"] in flaky and message.attempts < 2:
            # The first attempt of a flaky task fails; the retry works.
            message.nack(delay=0, error="transient failure")
            continue
        with lock:
            results.append((task["kind"], task["name"], message.attempts))
        message.ack()


def positive_int(text):
    """Parse a command-line count of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid int {text!r}; give a whole number of 1 or more"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be 1 or more, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=positive_int, default=3,
                        help="worker threads (1 or more)")
    parser.add_argument("--tasks", type=positive_int, default=30,
                        help="tasks of each kind (1 or more)")
    args = parser.parse_args(argv)

    broker = mqs.Broker()
    broker.declare_topic("tasks", policy="strict", max_attempts=3)
    # Publish everything before the workers start, so the order they see
    # comes from the priorities alone.
    for kind in ("cleanup", "report", "critical_alert"):
        broker.publish_many(
            "tasks",
            [{"kind": kind, "name": f"{kind}-{i}"} for i in range(args.tasks)],
            priority=PRIORITY[kind])

    results, lock = [], threading.Lock()
    flaky = {"report-3", "critical_alert-7"}
    consumers = [broker.consume("tasks", "workers", prefetch=1)
                 for _ in range(args.workers)]
    threads = [threading.Thread(target=worker,
                                args=(consumer, flaky, results, lock))
               for consumer in consumers]
    for thread in threads:
        thread.start()
    while broker.stats("tasks")["acked"] < 3 * args.tasks:
        broker.backend.wait_changed(0.05)
    for consumer in consumers:
        consumer.close()
    for thread in threads:
        thread.join()

    kinds = [kind for kind, _, _ in results]
    first_cleanup = kinds.index("cleanup")
    retried = sorted(name for _, name, attempts in results if attempts > 1)
    print(f"completed: {collections.Counter(kinds)}")
    print(f"critical alerts done before the first cleanup: "
          f"{kinds[:first_cleanup].count('critical_alert')}")
    print(f"retried after a failure: {retried}")
    return results


if __name__ == "__main__":
    main()
