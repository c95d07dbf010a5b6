"""An event-driven order pipeline on mqs.Broker with consumer groups.

Orders fan out to two consumer groups: "inventory" reserves stock and
"audit" records every order. When stock falls below a threshold, the
inventory service publishes a restock request to "purchasing", whose
worker orders more. Orders of one product (the message key) are reserved
in the order they were placed. Duplicate order events (a client
retrying) are dropped by their dedup_id.

    python examples/order_pipeline.py --orders 50
"""

import argparse
import threading

import mqs


def inventory(broker, stock, on_order, lock, threshold, stop):
    """Reserve stock per order; request a restock below `threshold`."""
    consumer = broker.consume("orders", "inventory", prefetch=8)
    while not stop.is_set():
        try:
            message = consumer.get(timeout=0.05)
        except mqs.Empty:
            continue
        order = message.body
        sku = order["sku"]
        with lock:
            stock[sku] -= order["quantity"]
            # Stock already ordered counts, so one shortage is requested
            # once, however late purchasing delivers.
            restock = stock[sku] + on_order[sku] < threshold
            if restock:
                on_order[sku] += 100
        if restock:
            broker.publish("purchasing", {"sku": sku, "quantity": 100})
        message.ack()
    consumer.close()


def audit(broker, seen, stop):
    consumer = broker.consume("orders", "audit", prefetch=8)
    while not stop.is_set():
        try:
            batch = consumer.get_many(8, timeout=0.05)
        except mqs.Empty:
            continue
        for message in batch:
            seen.append(message.body["order_id"])
            message.ack()
    consumer.close()


def purchasing(broker, stock, on_order, lock, restocked, stop):
    """Fill restock requests."""
    consumer = broker.consume("purchasing", "buyers")
    while not stop.is_set():
        try:
            message = consumer.get(timeout=0.05)
        except mqs.Empty:
            continue
        request = message.body
        with lock:
            stock[request["sku"]] += request["quantity"]
            on_order[request["sku"]] -= request["quantity"]
        restocked.append(request["sku"])
        message.ack()
    consumer.close()


def non_negative_int(text):
    """Parse a command-line count of 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid int {text!r}; give a whole number of 0 or more"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be 0 or more, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=non_negative_int, default=50,
                        help="orders to publish (0 or more)")
    args = parser.parse_args(argv)

    broker = mqs.Broker()
    broker.declare_topic("orders", dedup_window=60)
    stock = {"apple": 120, "pear": 80}
    on_order = {"apple": 0, "pear": 0}
    lock = threading.Lock()
    seen, restocked = [], []
    stop = threading.Event()
    # Create both groups before publishing, so each sees every order.
    threads = [
        threading.Thread(target=inventory,
                         args=(broker, stock, on_order, lock, 50, stop)),
        threading.Thread(target=audit, args=(broker, seen, stop)),
        threading.Thread(target=purchasing,
                         args=(broker, stock, on_order, lock, restocked,
                               stop)),
    ]
    for thread in threads:
        thread.start()
    while broker.stats("orders")["groups"] < 2:
        broker.backend.wait_changed(0.01)

    for i in range(args.orders):
        order = {"order_id": i, "sku": ("apple", "pear")[i % 2],
                 "quantity": 5}
        broker.publish("orders", order, key=order["sku"],
                       dedup_id=f"order-{i}")
        if i % 10 == 0:  # a client retry of the same order
            broker.publish("orders", order, key=order["sku"],
                           dedup_id=f"order-{i}")

    while broker.stats("orders")["acked"] < 2 * args.orders \
            or any(on_order.values()):
        broker.backend.wait_changed(0.05)
    stop.set()
    for thread in threads:
        thread.join()

    orders = broker.stats("orders")
    print(f"audited orders: {len(seen)}")
    print(f"duplicates dropped: {orders['deduplicated']}")
    print(f"restock requests: {len(restocked)}")
    print(f"stock: {stock}")
    return seen, restocked, stock, orders


if __name__ == "__main__":
    main()
