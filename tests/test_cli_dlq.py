"""Tests of `mqs dlq list|redrive|purge`, run in a subprocess against a
real log broker directory."""

import base64
import fcntl
import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

import mqs
from mqs.broker._log_shared import unlink_journal

from test_cli_ops import assert_one_line_error, run_mqs


def open_broker(path):
    return mqs.Broker("log", path=path, segment_bytes=1 << 20)


@pytest.fixture
def broker_dir(tmp_path):
    """A closed log broker whose topic "orders" has 3 dead letters
    (bodies 0, 1, 2, rejected) and 2 acked messages."""
    path = tmp_path / "broker"
    with open_broker(path) as broker:
        broker.declare_topic("orders")
        broker.publish_many("orders", [{"n": n} for n in range(5)])
        consumer = broker.consume("orders", "billing", prefetch=5)
        for message in consumer.get_many(5, timeout=5):
            if message.body["n"] < 3:
                message.nack(requeue=False, error=ValueError("bad total"))
            else:
                message.ack()
        consumer.close()
    return str(path)


def dead_letters(path):
    with open_broker(path) as broker:
        return broker.dlq_list("orders")


def dlq_json(path, *extra):
    result = run_mqs("dlq", "list", "orders", "--path", path, "--json",
                     *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("command", [[], ["list"], ["redrive"], ["purge"]])
def test_dlq_help(command):
    result = run_mqs("dlq", *command, "--help")
    assert result.returncode == 0
    assert "usage: mqs dlq" in result.stdout


def test_dlq_list_prints_table(broker_dir):
    result = run_mqs("dlq", "list", "orders", "--path", broker_dir)
    assert result.returncode == 0, result.stderr
    assert "dead letters of orders: 3" in result.stdout
    assert "rejected" in result.stdout
    assert "billing" in result.stdout
    assert "ValueError: bad total" in result.stdout
    assert "{'n': 2}" in result.stdout


def test_dlq_list_json_fields(broker_dir):
    letters = dlq_json(broker_dir)
    assert [letter["body"] for letter in letters] \
        == [{"n": 0}, {"n": 1}, {"n": 2}]
    first = letters[0]
    assert first["topic"] == "orders"
    assert first["group"] == "billing"
    assert first["reason"] == "rejected"
    assert first["attempts"] == 1
    assert first["error"] == "ValueError: bad total"
    assert first["headers"]["mqs.dead_letter_reason"] == "rejected"
    stored = dead_letters(broker_dir)
    assert [letter["id"] for letter in letters] \
        == [letter.id for letter in stored]


def test_dlq_list_json_any_picklable_body(tmp_path):
    """--json prints valid JSON for every picklable body and header: a
    dict key or a float that JSON cannot hold becomes its repr, as other
    objects do, instead of a traceback or a bare NaN."""
    path = str(tmp_path / "broker")
    bodies = [{("sku", 7): 2}, float("nan"), [float("inf")], {1: "one"},
              {1, 2}]
    with open_broker(path) as broker:
        broker.declare_topic("orders")
        for body in bodies:
            broker.publish("orders", body, headers={("a", 1): "tuple key"})
        consumer = broker.consume("orders", "billing", prefetch=10)
        for message in consumer.get_many(10, timeout=5):
            message.nack(requeue=False)
        consumer.close()
    result = run_mqs("dlq", "list", "orders", "--path", path, "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    def reject_constant(name):
        raise AssertionError(f"{name} is not valid JSON")

    letters = json.loads(result.stdout, parse_constant=reject_constant)
    assert [letter["body"] for letter in letters] == [
        {"('sku', 7)": 2}, "nan", ["inf"], {"1": "one"}, "{1, 2}"]
    assert letters[0]["headers"]["('a', 1)"] == "tuple key"


def test_dlq_list_limit(broker_dir):
    letters = dlq_json(broker_dir, "--limit", "2")
    assert [letter["body"]["n"] for letter in letters] == [0, 1]


def test_dlq_list_empty_topic(broker_dir):
    with open_broker(broker_dir) as broker:
        broker.declare_topic("quiet")
    result = run_mqs("dlq", "list", "quiet", "--path", broker_dir)
    assert result.returncode == 0, result.stderr
    assert "dead letters of quiet: 0" in result.stdout


def test_dlq_redrive_ids(broker_dir):
    ids = [letter.id for letter in dead_letters(broker_dir)]
    result = run_mqs("dlq", "redrive", "orders", "--path", broker_dir,
                     "--id", ids[0], "--id", ids[2], "--id", ids[0])
    assert result.returncode == 0, result.stderr
    assert "redrove 2 dead letter(s) of orders" in result.stdout
    with open_broker(broker_dir) as broker:
        assert [letter.id for letter in broker.dlq_list("orders")] \
            == [ids[1]]
        assert broker.stats("orders")["redriven"] == 2
        consumer = broker.consume("orders", "billing", prefetch=5)
        again = consumer.get_many(5, timeout=5)
        assert sorted(m.body["n"] for m in again) == [0, 2]
        assert [m.attempts for m in again] == [1, 1]
        for message in again:
            message.ack()
        consumer.close()


def test_dlq_redrive_all_json(broker_dir):
    result = run_mqs("dlq", "redrive", "orders", "--path", broker_dir,
                     "--all", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"topic": "orders", "redriven": 3}
    assert dead_letters(broker_dir) == []


def test_dlq_redrive_unknown_id_moves_nothing(broker_dir):
    first = dead_letters(broker_dir)[0].id
    result = run_mqs("dlq", "redrive", "orders", "--path", broker_dir,
                     "--id", first, "--id", "no-such-id", "--id", "")
    # Each id is quoted, so an empty one shows as ''.
    assert_one_line_error(result, "not in the dead-letter queue of "
                                  "'orders': 'no-such-id', ''; list")
    assert len(dead_letters(broker_dir)) == 3


def test_dlq_redrive_without_id_moves_all(broker_dir):
    result = run_mqs("dlq", "redrive", broker_dir, "orders", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"topic": "orders", "redriven": 3}
    assert dead_letters(broker_dir) == []


def test_dlq_redrive_id_and_all_is_error(broker_dir):
    result = run_mqs("dlq", "redrive", "orders", "--path", broker_dir,
                     "--all", "--id", "1")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_dlq_purge_without_yes_changes_nothing(broker_dir):
    result = run_mqs("dlq", "purge", "orders", "--path", broker_dir)
    assert result.returncode == 2
    assert "would delete 3 dead letter(s) of orders" in result.stderr
    assert len(dead_letters(broker_dir)) == 3


def test_dlq_purge_without_yes_is_one_line(broker_dir):
    result = run_mqs("dlq", "purge", "orders", "--path", broker_dir,
                     columns=40)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_dlq_purge_yes_deletes(broker_dir):
    result = run_mqs("dlq", "purge", "orders", "--path", broker_dir,
                     "--yes", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"topic": "orders", "purged": 3}
    with open_broker(broker_dir) as broker:
        assert broker.dlq_list("orders") == []
        assert broker.stats("orders")["dlq_purged"] == 3


@pytest.mark.parametrize("command", [["list"], ["redrive", "--all"],
                                     ["purge", "--yes"]])
def test_dlq_unknown_topic_is_one_line_error(broker_dir, command):
    result = run_mqs("dlq", command[0], "nope", "--path", broker_dir,
                     *command[1:])
    assert_one_line_error(result, "topic 'nope' not found in log broker")


def test_dlq_missing_path_is_one_line_error(tmp_path):
    missing = tmp_path / "missing"
    result = run_mqs("dlq", "list", "orders", "--path", str(missing))
    assert_one_line_error(result, "log broker directory")
    assert "not found" in result.stderr
    assert not missing.exists()


def test_dlq_file_path_is_one_line_error(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = run_mqs("dlq", "list", "orders", "--path", str(a_file))
    assert_one_line_error(result, "is not a directory")


def test_dlq_plain_directory_is_one_line_error(tmp_path):
    result = run_mqs("dlq", "list", "orders", "--path", str(tmp_path))
    assert_one_line_error(result, "is not a log broker directory")
    assert os.listdir(tmp_path) == []


_HOLDER = """
import sys, time
import mqs
broker = mqs.Broker("log", path=sys.argv[1], segment_bytes=1 << 20)
print("open", flush=True)
time.sleep(600)
"""


def test_dlq_works_while_broker_open_elsewhere(broker_dir):
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), broker_dir],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "open\n", child.stderr.read()
        # The log broker is shared: the command joins the open one.
        assert len(dlq_json(broker_dir)) == 3
        result = run_mqs("dlq", "purge", "orders", "--path", broker_dir,
                         "--yes")
        assert result.returncode == 0, result
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
        child.stderr.close()
        unlink_journal(broker_dir)
    assert dlq_json(broker_dir) == []


def test_dlq_held_writer_lock_is_one_line_error(broker_dir):
    # A process that holds the writer lock of a broker without a journal
    # (it uses one that was removed) keeps others from restoring it.
    fd = os.open(os.path.join(broker_dir, "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # `python -m mqs` with a shorter wait for the lock than 10 s.
        result = subprocess.run(
            [sys.executable, "-c",
             "import sys\n"
             "from mqs.broker import _log_shared\n"
             "_log_shared.RESTORE_WAIT_S = 0.5\n"
             "from mqs.cli import main\n"
             "sys.exit(main())",
             "dlq", "list", "orders", "--path", broker_dir],
            check=False, capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
        unlink_journal(broker_dir)
    assert_one_line_error(result, f"cannot open log broker {broker_dir!r}")
    assert "writer lock" in result.stderr


def test_dlq_needs_one_location(broker_dir):
    result = run_mqs("dlq", "list", "orders")
    assert result.returncode == 2
    assert "give the broker: BROKER orders" in result.stderr
    assert "one of the arguments --path --shm --url" in result.stderr


def test_dlq_broker_and_flag_is_usage_error(broker_dir):
    result = run_mqs("dlq", "list", broker_dir, "orders", "--path",
                     broker_dir)
    assert result.returncode == 2
    assert "either as BROKER or with --path, not both" in result.stderr


def test_dlq_positional_log_broker(broker_dir):
    listed = run_mqs("dlq", "list", broker_dir, "orders", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert [letter["body"] for letter in letters] == \
        [{"n": 0}, {"n": 1}, {"n": 2}]

    table = run_mqs("dlq", "list", broker_dir, "orders")
    assert table.returncode == 0, table.stderr
    assert "dead letters of orders: 3" in table.stdout

    redrive = run_mqs("dlq", "redrive", broker_dir, "orders", "--id",
                      letters[2]["id"], "--json")
    assert redrive.returncode == 0, redrive.stderr
    assert json.loads(redrive.stdout) == {"topic": "orders", "redriven": 1}

    purge = run_mqs("dlq", "purge", broker_dir, "orders", "--yes")
    assert purge.returncode == 0, purge.stderr
    assert "purged 2 dead letter(s) of orders" in purge.stdout
    assert dead_letters(broker_dir) == []


def test_dlq_positional_relative_log_dir(broker_dir):
    parent, name = os.path.split(broker_dir)
    result = run_mqs("dlq", "redrive", name, "orders", "--all", "--json",
                     cwd=parent)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"topic": "orders", "redriven": 3}
    assert dead_letters(broker_dir) == []


def test_dlq_positional_unknown_broker_is_error(tmp_path):
    name = f"test-cli-dlq-missing-{uuid.uuid4().hex[:12]}"
    result = run_mqs("dlq", "list", name, "orders", cwd=tmp_path)
    assert_one_line_error(result, f"no shm broker named '{name}'")
    assert "--shm NAME, --path LOGDIR or --url URL" in result.stderr
    assert not os.path.exists(f"/dev/shm/mqs.broker.{name}")
    assert not os.path.exists(tmp_path / name)

    missing = tmp_path / "nowhere"
    result = run_mqs("dlq", "list", str(missing), "orders")
    assert_one_line_error(result, f"log broker directory '{missing}' not "
                                  f"found")
    assert not missing.exists()

    result = run_mqs("dlq", "list", str(tmp_path), "orders")
    assert_one_line_error(result, "is not a log broker directory")


# Bodies of a class that the mqs subprocess cannot import.

APP_MODULE = """
class Order:
    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f"Order({self.n})"
"""


@pytest.fixture
def app_module(tmp_path, monkeypatch):
    """Import a module of class Order from a directory that only this
    process has on sys.path; yield the module."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    name = f"shop_models_{uuid.uuid4().hex[:12]}"
    (app_dir / f"{name}.py").write_text(APP_MODULE)
    monkeypatch.syspath_prepend(str(app_dir))
    yield importlib.import_module(name)
    del sys.modules[name]


def add_order_letter(broker, app_module):
    """Dead-letter an Order(9) in topic "orders"; return its id."""
    broker.declare_topic("orders")
    broker.publish("orders", app_module.Order(9))
    consumer = broker.consume("orders", "billing")
    message = consumer.get(timeout=5)
    message.nack(requeue=False, error="no such customer")
    consumer.close()
    return message.id


def with_app_path(monkeypatch, app_module):
    """Put the directory of `app_module` on the PYTHONPATH of the mqs
    subprocesses."""
    app_dir = os.path.dirname(app_module.__file__)
    paths = [app_dir, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        os.path.abspath(path) for path in paths if path))


def test_dlq_list_table_shows_undecodable_body(broker_dir, app_module):
    with open_broker(broker_dir) as broker:
        add_order_letter(broker, app_module)

    result = run_mqs("dlq", "list", "orders", "--path", broker_dir,
                     columns=400)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "dead letters of orders: 4" in result.stdout
    assert "{'n': 2}" in result.stdout
    assert "no such customer" in result.stdout
    assert "bytes that failed to deserialize: ModuleNotFoundError: " \
           f"No module named '{app_module.__name__}'" in result.stdout
    assert "1 dead letter(s) have a body that failed to deserialize" \
        in result.stdout


def test_dlq_list_json_undecodable_body(broker_dir, app_module):
    with open_broker(broker_dir) as broker:
        order_id = add_order_letter(broker, app_module)

    letters = dlq_json(broker_dir)

    assert [letter["id"] for letter in letters][-1] == order_id
    *others, order = letters
    assert [letter["body"] for letter in others] \
        == [{"n": 0}, {"n": 1}, {"n": 2}]
    for letter in others:
        assert letter["decode_error"] is None
        assert letter["raw_body_base64"] is None
    assert order["body"] is None
    assert order["decode_error"] == (
        f"ModuleNotFoundError: No module named '{app_module.__name__}'")
    assert order["error"] == "no such customer"
    assert order["reason"] == "rejected"
    assert order["attempts"] == 1
    raw_body = base64.b64decode(order["raw_body_base64"])
    assert pickle.loads(raw_body).n == 9


def test_dlq_list_decodes_body_with_app_path(broker_dir, app_module,
                                             monkeypatch):
    with open_broker(broker_dir) as broker:
        add_order_letter(broker, app_module)
    with_app_path(monkeypatch, app_module)

    order = dlq_json(broker_dir)[-1]

    assert order["body"] == "Order(9)"
    assert order["decode_error"] is None
    assert order["raw_body_base64"] is None


def test_dlq_redrive_and_purge_undecodable_body(broker_dir, app_module):
    with open_broker(broker_dir) as broker:
        order_id = add_order_letter(broker, app_module)

    would = run_mqs("dlq", "purge", "orders", "--path", broker_dir)
    assert would.returncode == 2
    assert "would delete 4 dead letter(s) of orders" in would.stderr

    redrive = run_mqs("dlq", "redrive", "orders", "--path", broker_dir,
                      "--id", order_id, "--json")
    assert redrive.returncode == 0, redrive.stderr
    assert json.loads(redrive.stdout) == {"topic": "orders", "redriven": 1}

    purge = run_mqs("dlq", "purge", "orders", "--path", broker_dir,
                    "--yes", "--json")
    assert purge.returncode == 0, purge.stderr
    assert json.loads(purge.stdout) == {"topic": "orders", "purged": 3}

    with open_broker(broker_dir) as broker:
        assert broker.dlq_list("orders") == []
        consumer = broker.consume("orders", "billing")
        message = consumer.get(timeout=5)
        assert message.id == order_id
        assert message.body.n == 9
        assert message.attempts == 1
        message.ack()
        consumer.close()


# Redis brokers: a namespace per test on the suite's throwaway server.

@pytest.fixture
def redis_broker(redis_url):
    """A redis broker in a fresh namespace whose topic "orders" has 2
    dead letters; yields (url, namespace)."""
    import redis

    namespace = f"mqs-cli-{uuid.uuid4().hex[:12]}"
    broker = mqs.Broker("redis", url=redis_url, serializer="pickle",
                        namespace=namespace)
    try:
        add_two_dead_letters(broker)
        yield redis_url, namespace
    finally:
        broker.close()
        client = redis.Redis.from_url(redis_url)
        try:
            keys = list(client.scan_iter(match=f"{{{namespace}:*"))
            if keys:
                client.unlink(*keys)
        finally:
            client.close()


def add_two_dead_letters(broker):
    """Declare topic "orders" and publish bodies 0, 1 and 2 to it. Group
    "billing" rejects 0 and 1, so they become dead letters, and acks 2."""
    broker.declare_topic("orders")
    broker.publish_many("orders", [{"n": n} for n in range(3)])
    consumer = broker.consume("orders", "billing", prefetch=3)
    for message in consumer.get_many(3, timeout=5):
        if message.body["n"] < 2:
            message.nack(requeue=False, error="bad total")
        else:
            message.ack()
    consumer.close()


def redis_args(redis_broker):
    url, namespace = redis_broker
    return ["--url", url, "-o", f"namespace={namespace}",
            "-o", "serializer=pickle"]


def test_dlq_redis_list_redrive_purge(redis_broker):
    args = redis_args(redis_broker)
    listed = run_mqs("dlq", "list", "orders", *args, "--json")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert [letter["body"] for letter in letters] == [{"n": 0}, {"n": 1}]
    assert letters[0]["error"] == "bad total"
    assert letters[0]["group"] == "billing"

    redrive = run_mqs("dlq", "redrive", "orders", *args,
                      "--id", letters[0]["id"], "--json")
    assert redrive.returncode == 0, redrive.stderr
    assert json.loads(redrive.stdout) == {"topic": "orders", "redriven": 1}

    purge = run_mqs("dlq", "purge", "orders", *args, "--yes", "--json")
    assert purge.returncode == 0, purge.stderr
    assert json.loads(purge.stdout) == {"topic": "orders", "purged": 1}

    url, namespace = redis_broker
    broker = mqs.Broker("redis", url=url, serializer="pickle",
                        namespace=namespace)
    try:
        assert broker.dlq_list("orders") == []
        consumer = broker.consume("orders", "billing")
        message = consumer.get(timeout=5)
        assert message.body == {"n": 0}
        message.ack()
        consumer.close()
    finally:
        broker.close()


def test_dlq_redis_list_undecodable_body(redis_broker, app_module):
    url, namespace = redis_broker
    with mqs.Broker("redis", url=url, serializer="pickle",
                    namespace=namespace) as broker:
        order_id = add_order_letter(broker, app_module)

    listed = run_mqs("dlq", "list", "orders", *redis_args(redis_broker),
                     "--json")

    assert listed.returncode == 0, listed.stderr
    *others, order = json.loads(listed.stdout)
    assert [letter["body"] for letter in others] == [{"n": 0}, {"n": 1}]
    assert order["id"] == order_id
    assert order["body"] is None
    assert order["decode_error"].startswith("ModuleNotFoundError: ")
    raw_body = base64.b64decode(order["raw_body_base64"])
    assert pickle.loads(raw_body).n == 9


def test_dlq_redis_undecodable_key_and_headers(redis_broker, app_module):
    url, namespace = redis_broker
    with mqs.Broker("redis", url=url, serializer="pickle",
                    namespace=namespace) as broker:
        broker.publish("orders", "paid", key=app_module.Order(7),
                       headers={"order": app_module.Order(8)})
        consumer = broker.consume("orders", "billing")
        message = consumer.get(timeout=5)
        message.nack(requeue=False, error="no such customer")
        consumer.close()
    args = redis_args(redis_broker)

    listed = run_mqs("dlq", "list", "orders", *args, "--json")
    table = run_mqs("dlq", "list", "orders", *args, columns=400)
    redrive = run_mqs("dlq", "redrive", "orders", *args, "--id",
                      message.id, "--json")

    assert listed.returncode == 0, listed.stderr
    *others, order = json.loads(listed.stdout)
    assert [letter["body"] for letter in others] == [{"n": 0}, {"n": 1}]
    assert order["id"] == message.id
    assert order["body"] == "paid"
    assert order["key"] is None
    assert "order" not in order["headers"]
    assert order["headers"]["mqs.last_error"] == "no such customer"
    missing = f"No module named '{app_module.__name__}'"
    assert order["decode_error"] == (
        f"key: ModuleNotFoundError: {missing}; "
        f"headers: ModuleNotFoundError: {missing}")
    assert order["raw_body_base64"] is None
    raw_key = base64.b64decode(order["raw_key_base64"])
    assert pickle.loads(raw_key).n == 7
    raw_headers = base64.b64decode(order["raw_headers_base64"])
    assert pickle.loads(raw_headers)["order"].n == 8

    assert table.returncode == 0, table.stderr
    assert "1 dead letter(s) have a key or headers that failed to " \
           "deserialize" in table.stdout

    assert redrive.returncode == 0, redrive.stderr
    assert json.loads(redrive.stdout) == {"topic": "orders", "redriven": 1}


def test_dlq_redis_list_without_pickle_names_option(redis_broker):
    url, namespace = redis_broker
    listed = run_mqs("dlq", "list", "orders", "--url", url, "-o",
                     f"namespace={namespace}", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert len(letters) == 2
    # Without the option the bodies stay pickled bytes.
    assert letters[0]["body"] != {"n": 0}
    warnings = [line for line in listed.stderr.splitlines()
                if "has a pickled body" in line]
    # Logged at the 1st, 10th, 100th ... such body.
    assert len(warnings) == 1
    assert "(1 such bodies so far)" in warnings[0]
    assert "rerun with -o serializer=pickle to unpickle them" in warnings[0]
    assert "serializer='pickle'" not in listed.stderr


def test_dlq_redis_unknown_topic_is_one_line_error(redis_broker):
    result = run_mqs("dlq", "list", "nope", *redis_args(redis_broker))
    _, namespace = redis_broker
    assert_one_line_error(
        result, f"topic 'nope' not found in namespace {namespace!r} of "
                f"redis broker")
    assert "-o namespace=NAME" in result.stderr


def test_dlq_bad_backend_option_is_one_line_error(redis_broker):
    url, _ = redis_broker
    result = run_mqs("dlq", "list", "orders", "--url", url,
                     "-o", "colour=blue")
    assert_one_line_error(result, "cannot open the redis broker")
    assert "unexpected keyword argument 'colour'" in result.stderr
    assert "see help(mqs.Broker)" in result.stderr
    result = run_mqs("dlq", "list", "orders", "--url", url,
                     "-o", "url=redis://elsewhere")
    assert_one_line_error(result, "give the url with --url")
    result = run_mqs("dlq", "list", "orders", "--url", url, "-o", "novalue")
    assert result.returncode == 2
    assert "invalid backend option 'novalue'" in result.stderr


# Shm brokers: they stay in /dev/shm after close until unlinked.

@pytest.fixture
def shm_broker():
    """An shm broker whose topic "orders" has 2 dead letters; yields its
    name and unlinks it after the test."""
    name = f"test-cli-dlq-{uuid.uuid4().hex[:12]}"
    broker = mqs.Broker("shm", name=name)
    try:
        add_two_dead_letters(broker)
        broker.close()
        yield name
    finally:
        broker.close()
        mqs.Broker.unlink(name)


def test_dlq_shm_list_redrive_purge(shm_broker):
    listed = run_mqs("dlq", "list", "orders", "--shm", shm_broker, "--json")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert [letter["body"] for letter in letters] == [{"n": 0}, {"n": 1}]
    assert letters[1]["reason"] == "rejected"

    redrive = run_mqs("dlq", "redrive", "orders", "--shm", shm_broker,
                      "--id", letters[1]["id"])
    assert redrive.returncode == 0, redrive.stderr
    assert "redrove 1 dead letter(s) of orders" in redrive.stdout

    purge = run_mqs("dlq", "purge", "orders", "--shm", shm_broker, "--yes")
    assert purge.returncode == 0, purge.stderr
    assert "purged 1 dead letter(s) of orders" in purge.stdout

    with mqs.Broker("shm", name=shm_broker) as broker:
        assert broker.dlq_list("orders") == []
        stats = broker.stats("orders")
        assert stats["redriven"] == 1
        assert stats["dlq_purged"] == 1
        consumer = broker.consume("orders", "billing")
        message = consumer.get(timeout=5)
        assert message.body == {"n": 1}
        message.ack()
        consumer.close()


def test_dlq_shm_list_undecodable_body(shm_broker, app_module):
    with mqs.Broker("shm", name=shm_broker) as broker:
        order_id = add_order_letter(broker, app_module)

    listed = run_mqs("dlq", "list", "orders", "--shm", shm_broker, "--json")

    assert listed.returncode == 0, listed.stderr
    *others, order = json.loads(listed.stdout)
    assert [letter["body"] for letter in others] == [{"n": 0}, {"n": 1}]
    assert order["id"] == order_id
    assert order["body"] is None
    assert order["decode_error"].startswith("ModuleNotFoundError: ")


def test_dlq_positional_shm_broker(shm_broker):
    listed = run_mqs("dlq", "list", shm_broker, "orders", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert [letter["body"] for letter in letters] == [{"n": 0}, {"n": 1}]

    redrive = run_mqs("dlq", "redrive", shm_broker, "orders", "--all")
    assert redrive.returncode == 0, redrive.stderr
    assert "redrove 2 dead letter(s) of orders" in redrive.stdout

    with mqs.Broker("shm", name=shm_broker) as broker:
        assert broker.dlq_list("orders") == []
        assert broker.stats("orders")["redriven"] == 2

    purge = run_mqs("dlq", "purge", shm_broker, "orders", "--yes",
                    "--json")
    assert purge.returncode == 0, purge.stderr
    assert json.loads(purge.stdout) == {"topic": "orders", "purged": 0}


def test_dlq_positional_unknown_topic_is_error(shm_broker):
    result = run_mqs("dlq", "list", shm_broker, "nope")
    assert_one_line_error(result, "topic 'nope' not found in shm broker")


def test_dlq_name_both_shm_and_log_is_error(shm_broker, tmp_path):
    with open_broker(tmp_path / shm_broker) as broker:
        broker.declare_topic("orders")
    result = run_mqs("dlq", "list", shm_broker, "orders", cwd=tmp_path)
    assert_one_line_error(result, "is both an shm broker name and a log "
                                  "broker directory")
    assert f"--shm {shm_broker} or --path ./{shm_broker}" in result.stderr

    # The flags pick one.
    by_shm = run_mqs("dlq", "list", "orders", "--shm", shm_broker,
                     "--json", cwd=tmp_path)
    assert by_shm.returncode == 0, by_shm.stderr
    assert len(json.loads(by_shm.stdout)) == 2
    by_path = run_mqs("dlq", "list", "orders", "--path", f"./{shm_broker}",
                      "--json", cwd=tmp_path)
    assert by_path.returncode == 0, by_path.stderr
    assert json.loads(by_path.stdout) == []


def test_dlq_shm_missing_name_is_one_line_error():
    name = f"test-cli-dlq-missing-{uuid.uuid4().hex[:12]}"
    result = run_mqs("dlq", "list", "orders", "--shm", name)
    assert_one_line_error(result, f"shm broker '{name}' not found")
    assert not os.path.exists(f"/dev/shm/mqs.broker.{name}")
    result = run_mqs("dlq", "list", "orders", "--shm", "a/b")
    assert_one_line_error(result, "invalid shm broker name 'a/b'")


def test_dlq_shm_unknown_topic_is_one_line_error(shm_broker):
    result = run_mqs("dlq", "purge", "nope", "--shm", shm_broker, "--yes")
    assert_one_line_error(result, "topic 'nope' not found in shm broker")


def test_dlq_unreachable_redis_fails_fast():
    from test_cli_ops import closed_redis_url

    pytest.importorskip("redis")
    result = run_mqs("dlq", "list", "orders", "--url", closed_redis_url(),
                     "--retry-timeout", "0")
    assert_one_line_error(result, "unreachable for 0.0 s")
    assert "raise --retry-timeout" in result.stderr

    result = run_mqs("dlq", "list", "orders", "--url", closed_redis_url(),
                     "-o", "retry_timeout=60")
    assert_one_line_error(result, "give the retry_timeout with "
                                  "--retry-timeout")


def test_dlq_list_into_closed_pipe_is_quiet(tmp_path):
    path = tmp_path / "broker"
    broker = mqs.Broker(backend="log", path=path)
    broker.declare_topic("t", max_attempts=1)
    consumer = broker.consume("t", "g", prefetch=3000)
    for _ in range(3000):
        broker.publish("t", "x" * 200)
    for message in consumer.get_many(3000, timeout=5):
        message.nack(requeue=False)
    consumer.close()
    broker.close()
    # Far more JSON than a pipe buffer: the command is still writing
    # when the reader goes away, as with `mqs dlq list ... | head -1`.
    process = subprocess.Popen(
        [sys.executable, "-m", "mqs", "dlq", "list", "--path", str(path),
         "t", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.read(1) == b"["
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(60) == 141
    assert stderr == ""
