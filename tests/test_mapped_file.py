"""Tests of the create-or-attach steps that SharedJournal and TopicCore
share: a new file, a second handle, files of another layout, closing,
and no temporary file left behind."""

import os
import uuid

import pytest

from mqs._journal import JournalLayoutError, SharedJournal
from mqs._topiccore import TopicCore, TopicCoreLayoutError

LANES = ((9, 8), (5, 4), (0, 1))
KINDS = {
    "journal": (lambda path: SharedJournal(path, 1 << 16),
                JournalLayoutError, "an shm broker"),
    "topic core": (lambda path: TopicCore(path, LANES),
                   TopicCoreLayoutError, "a topic core"),
}


@pytest.fixture
def path():
    name = f"/dev/shm/mqs.test-mapped.{os.getpid()}.{uuid.uuid4().hex}"
    yield name
    if os.path.exists(name):
        os.unlink(name)


def leftovers(path):
    directory, base = os.path.split(path)
    return [entry for entry in os.listdir(directory)
            if entry.startswith(base + ".")]


@pytest.mark.parametrize("kind", KINDS)
def test_mapped_file_create_then_attach(path, kind):
    open_file, _, _ = KINDS[kind]
    first = open_file(path)
    second = open_file(path)
    assert first.created
    assert not second.created
    assert first.path == path
    assert second.path == path
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert leftovers(path) == []
    first.close()
    second.close()


@pytest.mark.parametrize("kind", KINDS)
def test_mapped_file_rejects_small_file(path, kind):
    open_file, error, name = KINDS[kind]
    with open(path, "wb") as file:
        file.write(b"\0" * 100)
    with pytest.raises(error) as caught:
        open_file(path)
    assert f"{path} is 100 bytes, too small for {name}" in str(caught.value)
    assert os.path.getsize(path) == 100
    assert leftovers(path) == []


@pytest.mark.parametrize("kind", KINDS)
def test_mapped_file_rejects_foreign_file(path, kind):
    open_file, error, _ = KINDS[kind]
    with open(path, "wb") as file:
        file.write(b"\0" * (1 << 20))
    with pytest.raises(error) as caught:
        open_file(path)
    assert "of this mqs (bad header, never initialised)" in str(caught.value)
    assert leftovers(path) == []


@pytest.mark.parametrize("kind", KINDS)
def test_mapped_file_close_is_idempotent(path, kind):
    open_file, _, _ = KINDS[kind]
    handle = open_file(path)
    handle.close()
    handle.close()
    # The file stays for other processes until it is unlinked.
    assert os.path.exists(path)
    again = open_file(path)
    assert not again.created
    again.close()
