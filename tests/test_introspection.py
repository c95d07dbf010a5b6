"""inspect.signature, help() and the stubs for every public callable.

The Cython classes get their signatures from docstrings: Cython writes
one per method ("embedsignature.format" "clinic" in setup.py), and each
class writes its constructor's by hand in the first docstring lines.
These tests check that inspect can read every one of them and that they
agree with the .pyx constructors, the .pyi stubs and the documented API.
"""

import ast
import inspect
import pathlib
import pydoc
import re
import types

import pytest

import mqs
import mqs.broker
import mqs.metrics
import mqs.queue
import mqs.shared
from mqs import _journal, _queue, _ring, _seglog, _shared, _slots, _topiccore, _wheel
from mqs.broker import _broker

PACKAGE = pathlib.Path(mqs.__file__).parent
PUBLIC_MODULES = [mqs, mqs.broker, mqs.queue, mqs.shared, mqs.metrics]
_EMPTY = inspect.Parameter.empty

# Public Cython classes: (class, module, .pyx or .pxi file that defines
# it, .pyi stub that types it). MessageBase is public as the base of
# mqs.Message, which takes its constructor.
NATIVE_CLASSES = [
    (mqs.Queue, _queue, "_queue.pyx", "_queue.pyi"),
    (mqs.SimpleQueue, _queue, "_queue.pyx", "_queue.pyi"),
    (mqs.SharedQueue, _shared, "_shared.pyx", "_shared.pyi"),
    (mqs.RingBuffer, _ring, "_ring.pyx", "_ring.pyi"),
    (mqs.TimingWheel, _wheel, "_wheel.pyx", "_wheel.pyi"),
    (mqs.SegmentLog, _seglog, "_seglog.pyx", "_seglog.pyi"),
    (_topiccore.MessageBase, _topiccore, "_fastpath.pxi", "_topiccore.pyi"),
]

# Internal Cython classes that a stub types, in rows like NATIVE_CLASSES.
# inspect cannot read their constructor signatures, so the stub checks
# compare their __init__ with the source.
STUBBED_INTERNAL_CLASSES = [
    (_topiccore.TopicCore, _topiccore, "_topiccore.pyx", "_topiccore.pyi"),
    (_topiccore.CorePath, _topiccore, "_fastpath.pxi", "_topiccore.pyi"),
    (_topiccore.CoreReader, _topiccore, "_fastpath.pxi", "_topiccore.pyi"),
]

# Compiled modules with a .pyi stub next to them.
STUBBED_MODULES = [_journal, _queue, _ring, _seglog, _shared, _slots,
                   _topiccore, _wheel]


def _defines_init(cls):
    return any("__init__" in vars(base) for base in cls.__mro__
               if base.__module__.startswith("mqs"))


def _public_callables():
    """Return (qualified name, object) for each public callable of mqs.

    Exception classes that keep BaseException's constructor are left
    out, because CPython 3.11 has no signature for it (inspect.signature
    raises ValueError for ValueError itself).
    """
    found = {}
    for module in PUBLIC_MODULES:
        names = getattr(module, "__all__", None)
        if names is None:
            names = [name for name, value in vars(module).items()
                     if not name.startswith("_")
                     and getattr(value, "__module__", None) == module.__name__]
        for name in names:
            value = getattr(module, name)
            if not callable(value) or id(value) in found:
                continue
            if isinstance(value, type) and issubclass(value, BaseException) \
                    and not _defines_init(value):
                continue
            found[id(value)] = (f"{module.__name__}.{name}", value)
    return sorted(found.values(), key=lambda pair: pair[0])


def _owner(cls, name):
    for base in cls.__mro__:
        if name in vars(base):
            return base
    return None


def _public_methods():
    """Return (qualified name, method) for each public method of every
    public class, inherited ones included when mqs defines them."""
    methods = []
    for qualified, cls in _public_callables():
        if not isinstance(cls, type) or issubclass(cls, BaseException):
            continue
        for name in dir(cls):
            if name.startswith("_"):
                continue
            owner = _owner(cls, name)
            if owner is None or not owner.__module__.startswith("mqs"):
                continue
            static = inspect.getattr_static(cls, name)
            if isinstance(static, (property, types.GetSetDescriptorType,
                                   types.MemberDescriptorType, type)):
                continue
            value = getattr(cls, name)
            if callable(value):
                methods.append((f"{qualified}.{name}", value))
    return methods


PUBLIC_CALLABLES = _public_callables()
PUBLIC_METHODS = _public_methods()


def test_public_callables_found():
    names = {name for name, _ in PUBLIC_CALLABLES}
    assert "mqs.Queue" in names
    assert "mqs.SharedQueue" in names
    assert "mqs.broker.Backend" in names
    assert "mqs.metrics.default_sample_every" in names
    methods = {name for name, _ in PUBLIC_METHODS}
    assert "mqs.Queue.put" in methods
    assert "mqs.Message.ack" in methods
    assert "mqs.SegmentLog.read_batch" in methods


@pytest.mark.parametrize("name, value", PUBLIC_CALLABLES,
                         ids=[name for name, _ in PUBLIC_CALLABLES])
def test_signature_of_public_callable(name, value):
    signature = inspect.signature(value)
    assert isinstance(signature, inspect.Signature)


@pytest.mark.parametrize("name, method", PUBLIC_METHODS,
                         ids=[name for name, _ in PUBLIC_METHODS])
def test_signature_of_public_method(name, method):
    signature = inspect.signature(method)
    assert isinstance(signature, inspect.Signature)


# ---- Cython classes ---------------------------------------------------------

def _split_parameters(text):
    """Split a parameter list at the commas outside brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _python_parameter(parameter):
    """Drop the C type of a Cython parameter: "int n=0" becomes "n=0"."""
    if parameter in ("*", "/") or parameter.startswith("*"):
        return parameter
    declaration, equals, default = parameter.partition("=")
    name = declaration.split()[-1]
    return f"{name}={default.strip()}" if equals else name


def _constructor_source(cls, filename):
    """Return the parameter list of the constructor in the source: that of
    ``__init__``, or of ``__cinit__`` if the class has no ``__init__``."""
    source = (PACKAGE / filename).read_text(encoding="utf-8")
    start = source.index(f"cdef class {cls.__name__}")
    end = source.find("\ncdef class ", start + 1)
    body = source[start:end if end != -1 else len(source)]
    for method in ("__init__", "__cinit__"):
        head = body.find(f"    def {method}(")
        if head != -1:
            break
    else:
        raise AssertionError(f"{filename}: {cls.__name__} has no constructor")
    opening = body.index("(", head)
    depth = 0
    for position in range(opening, len(body)):
        if body[position] == "(":
            depth += 1
        elif body[position] == ")":
            depth -= 1
            if depth == 0:
                return body[opening + 1:position]
    raise AssertionError(f"{filename}: unbalanced {method} parameters")


def _source_signature(cls, module, filename):
    parameters = [_python_parameter(parameter) for parameter
                  in _split_parameters(_constructor_source(cls, filename))]
    namespace = {}
    # The module's globals let a default name one of its constants.
    exec(f"def constructor({', '.join(parameters)}): pass",
         dict(vars(module)), namespace)
    signature = inspect.signature(namespace["constructor"])
    without_self = list(signature.parameters.values())[1:]
    return signature.replace(parameters=without_self)


@pytest.mark.parametrize("cls, module, source, stub", NATIVE_CLASSES,
                         ids=[row[0].__name__ for row in NATIVE_CLASSES])
def test_class_signature_matches_source(cls, module, source, stub):
    assert inspect.signature(cls) == _source_signature(cls, module, source)


@pytest.mark.parametrize("cls, module, source, stub", NATIVE_CLASSES,
                         ids=[row[0].__name__ for row in NATIVE_CLASSES])
def test_class_docstring_keeps_text_after_signature(cls, module, source,
                                                    stub):
    doc = inspect.getdoc(cls)
    assert doc is not None
    assert not doc.startswith(cls.__name__ + "(")
    assert "\n--\n" not in doc
    signature = inspect.signature(cls)
    rendered = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    # pydoc leaves out an empty "()".
    if signature.parameters:
        assert f"{cls.__name__}{signature}" in rendered


def test_help_shows_method_signature():
    rendered = pydoc.render_doc(mqs.Queue, renderer=pydoc.plaintext)
    assert ("put(self, /, item, block=True, timeout=None, *, delay=None, "
            "at=None)") in rendered


# ---- Stubs ------------------------------------------------------------------

def _stub_functions(stub, class_name):
    """Return {name: ast.FunctionDef} of the methods of `class_name` in a
    .pyi stub, properties left out."""
    tree = ast.parse((PACKAGE / stub).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {
                item.name: item for item in node.body
                if isinstance(item, ast.FunctionDef)
                and not any(isinstance(decorator, ast.Name)
                            and decorator.id == "property"
                            for decorator in item.decorator_list)}
    raise AssertionError(f"{stub} has no class {class_name}")


def _stub_parameters(function):
    """Return [(name, kind, default)] of a stub function without its
    first parameter. A missing default is inspect.Parameter.empty, and
    ``...`` is Ellipsis."""
    arguments = function.args
    positional = arguments.posonlyargs + arguments.args
    defaults = [_EMPTY] * (len(positional) - len(arguments.defaults)) \
        + [ast.literal_eval(default) for default in arguments.defaults]
    rows = [(argument.arg, default) for argument, default
            in zip(positional, defaults)][1:]
    result = [(name, "positional", default) for name, default in rows]
    if arguments.vararg:
        result.append((arguments.vararg.arg, "var_positional", _EMPTY))
    for argument, default in zip(arguments.kwonlyargs, arguments.kw_defaults):
        value = _EMPTY if default is None else ast.literal_eval(default)
        result.append((argument.arg, "keyword_only", value))
    if arguments.kwarg:
        result.append((arguments.kwarg.arg, "var_keyword", _EMPTY))
    return result


_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "var_positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword_only",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}


def _runtime_parameters(signature, stub_parameters):
    """Return [(name, kind, default)] of a runtime signature, with the
    default taken as Ellipsis where the stub writes ``...``."""
    stub_defaults = {name: default for name, _, default in stub_parameters}
    result = []
    for parameter in signature.parameters.values():
        if parameter.default is _EMPTY:
            default = _EMPTY
        elif stub_defaults.get(parameter.name) is Ellipsis:
            default = Ellipsis
        else:
            default = parameter.default
        result.append((parameter.name, _KINDS[parameter.kind], default))
    return result


def _stub_cases():
    cases = []
    for cls, module, source, stub in NATIVE_CLASSES + STUBBED_INTERNAL_CLASSES:
        if stub is None:
            continue
        for name, function in _stub_functions(stub, cls.__name__).items():
            if name.startswith("_") and name != "__init__":
                continue
            cases.append(pytest.param(cls, module, source, name, function,
                                      id=f"{cls.__name__}.{name}"))
    return cases


@pytest.mark.parametrize("cls, module, source, name, function",
                         _stub_cases())
def test_stub_matches_runtime_signature(cls, module, source, name,
                                        function):
    expected = _stub_parameters(function)
    if name == "__init__":
        # The same as inspect.signature(cls) for NATIVE_CLASSES (see
        # test_class_signature_matches_source).
        signature = _source_signature(cls, module, source)
    else:
        method = inspect.signature(getattr(cls, name))
        signature = method.replace(
            parameters=list(method.parameters.values())[1:])
    assert _runtime_parameters(signature, expected) == expected


# Class members that Python, Cython or typing.NamedTuple adds, or that
# typeshed declares on object, so a stub need not repeat them.
_IMPLICIT_MEMBERS = {"__dict__", "__doc__", "__getnewargs__",
                     "__match_args__", "__module__", "__new__",
                     "__pyx_vtable__", "__reduce__", "__repr__",
                     "__setstate__", "__slots__", "__weakref__"}


def _stub_names(nodes):
    """Return {name: node} of the definitions among stub AST nodes."""
    names = {}
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign):
            names[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names[target.id] = node
    return names


def _stub_module(module):
    stub = PACKAGE / f"{module.__name__.rpartition('.')[2]}.pyi"
    return ast.parse(stub.read_text(encoding="utf-8"))


def _runtime_names(module):
    """Return the public names that `module` defines: its functions,
    classes and constants, without the modules, classes and functions it
    imports."""
    return {name for name, value in vars(module).items()
            if not name.startswith("_")
            and not isinstance(value, types.ModuleType)
            and getattr(value, "__module__", module.__name__)
            == module.__name__}


def _runtime_members(cls):
    return {name for name in vars(cls)
            if name not in _IMPLICIT_MEMBERS
            and (not name.startswith("_") or name.startswith("__"))}


@pytest.mark.parametrize("module", STUBBED_MODULES,
                         ids=[module.__name__ for module in STUBBED_MODULES])
def test_stub_declares_module_names(module):
    names = _stub_names(_stub_module(module).body)
    missing = _runtime_names(module) - set(names)
    assert missing == set()
    unknown = {name for name in names
               if not name.startswith("_") and not hasattr(module, name)}
    assert unknown == set()
    if "__all__" in names:
        assert ast.literal_eval(names["__all__"].value) == module.__all__


@pytest.mark.parametrize("module", STUBBED_MODULES,
                         ids=[module.__name__ for module in STUBBED_MODULES])
def test_stub_declares_class_members(module):
    for name, node in _stub_names(_stub_module(module).body).items():
        # A stub-only class, such as a Protocol, has no runtime members.
        if not isinstance(node, ast.ClassDef) or not hasattr(module, name):
            continue
        cls = getattr(module, name)
        members = set(_stub_names(node.body))
        assert _runtime_members(cls) - members == set(), name
        unknown = {member for member in members
                   if not member.startswith("_") and not hasattr(cls, member)}
        assert unknown == set(), name


# ---- Documented API ---------------------------------------------------------

# Parameters that the mqs API contract names, as
# (callable, parameter, kind, default); kind None leaves the kind open
# and default inspect.Parameter.empty marks a required parameter or a
# default the contract does not fix.
_KEYWORD = inspect.Parameter.KEYWORD_ONLY
_POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
DOCUMENTED = [
    (mqs.Queue, "maxsize", _POSITIONAL, 0),
    (mqs.Queue.put, "item", _POSITIONAL, _EMPTY),
    (mqs.Queue.put, "timeout", None, None),
    (mqs.Queue.put, "delay", _KEYWORD, None),
    (mqs.Queue.put, "at", _KEYWORD, None),
    (mqs.Queue.get, "timeout", None, None),
    (mqs.Queue.put_many, "items", _POSITIONAL, _EMPTY),
    (mqs.Queue.get_many, "max_items", _POSITIONAL, _EMPTY),
    (mqs.Queue.get_many, "timeout", None, None),
    (mqs.SimpleQueue.get_many, "max_items", _POSITIONAL, _EMPTY),
    (mqs.SharedQueue, "maxsize", _POSITIONAL, 0),
    (mqs.SharedQueue, "name", _KEYWORD, None),
    (mqs.SharedQueue, "create", _KEYWORD, True),
    (mqs.SharedQueue, "capacity_bytes", _KEYWORD, _EMPTY),
    (mqs.SharedQueue, "max_message_size", _KEYWORD, _EMPTY),
    (mqs.SharedQueue, "serializer", _KEYWORD, _EMPTY),
    (mqs.SharedQueue, "persist", _KEYWORD, None),
    (mqs.SharedQueue, "wait_strategy", _KEYWORD, "block"),
    (mqs.SharedQueue, "delayed_capacity_bytes", _KEYWORD, _EMPTY),
    (mqs.SharedQueue.put, "delay", _KEYWORD, None),
    (mqs.SharedQueue.put, "at", _KEYWORD, None),
    (mqs.SharedQueue.get, "timeout", None, None),
    (mqs.SharedQueue.get_view, "timeout", None, None),
    (mqs.SegmentLog, "path", _POSITIONAL, _EMPTY),
    (mqs.SegmentLog, "fsync", None, "interval"),
    (mqs.SegmentLog.append, "data", _POSITIONAL, _EMPTY),
    (mqs.SegmentLog.read_batch, "offset", _POSITIONAL, _EMPTY),
    (mqs.SegmentLog.read_batch, "max_records", _POSITIONAL, _EMPTY),
    (mqs.SegmentLog.commit, "group", _POSITIONAL, _EMPTY),
    (mqs.SegmentLog.commit, "offset", _POSITIONAL, _EMPTY),
    (mqs.Broker, "backend", _POSITIONAL, "memory"),
    (mqs.Broker.declare_topic, "topic", _POSITIONAL, _EMPTY),
    (mqs.Broker.declare_topic, "weights", _KEYWORD, _EMPTY),
    (mqs.Broker.declare_topic, "policy", _KEYWORD, _EMPTY),
    (mqs.Broker.declare_topic, "rate", _KEYWORD, _EMPTY),
    (mqs.Broker.declare_topic, "dedup_window", _KEYWORD, _EMPTY),
    (mqs.Broker.declare_topic, "max_attempts", _KEYWORD, _EMPTY),
    (mqs.Broker.declare_topic, "retry", _KEYWORD, _EMPTY),
    (mqs.Broker.declare_topic, "ttl", _KEYWORD, _EMPTY),
    (mqs.Broker.declare_topic, "retention", _KEYWORD, _EMPTY),
    (mqs.Broker.declare_topic, "when_full", _KEYWORD, _EMPTY),
    (mqs.Broker.publish, "topic", _POSITIONAL, _EMPTY),
    (mqs.Broker.publish, "body", _POSITIONAL, _EMPTY),
    (mqs.Broker.publish, "priority", _KEYWORD, 0),
    (mqs.Broker.publish, "delay", _KEYWORD, None),
    (mqs.Broker.publish, "at", _KEYWORD, None),
    (mqs.Broker.publish, "key", _KEYWORD, None),
    (mqs.Broker.publish, "headers", _KEYWORD, None),
    (mqs.Broker.publish, "dedup_id", _KEYWORD, None),
    (mqs.Broker.publish, "reply_to", _KEYWORD, None),
    (mqs.Broker.publish, "ttl", _KEYWORD, None),
    (mqs.Broker.publish_many, "topic", _POSITIONAL, _EMPTY),
    (mqs.Broker.publish_async, "topic", _POSITIONAL, _EMPTY),
    (mqs.Broker.consume, "topic", _POSITIONAL, _EMPTY),
    (mqs.Broker.consume, "group", _POSITIONAL, _EMPTY),
    (mqs.Broker.consume, "prefetch", _KEYWORD, _EMPTY),
    (mqs.Broker.consume, "ack_timeout", _KEYWORD, _EMPTY),
    (mqs.Broker.consume, "auto_ack", _KEYWORD, False),
    (mqs.Broker.consume, "start", _KEYWORD, "earliest"),
    (mqs.Broker.request, "topic", _POSITIONAL, _EMPTY),
    (mqs.Broker.request, "body", _POSITIONAL, _EMPTY),
    (mqs.Broker.request, "timeout", _POSITIONAL, _EMPTY),
    (mqs.Consumer.get, "timeout", None, None),
    (mqs.Consumer.get_many, "max_items", _POSITIONAL, _EMPTY),
    (mqs.Consumer.get_many, "timeout", None, None),
    (mqs.Consumer.get_async, "timeout", None, None),
    (mqs.Consumer.close, "drain", None, _EMPTY),
    (mqs.Message.nack, "requeue", _POSITIONAL, True),
    (mqs.Message.nack, "delay", _POSITIONAL, None),
    (mqs.Message.extend, "seconds", _POSITIONAL, _EMPTY),
    (mqs.Backoff, "base", None, _EMPTY),
    (mqs.Backoff, "factor", None, _EMPTY),
    (mqs.Backoff, "max", None, _EMPTY),
]


@pytest.mark.parametrize(
    "function, name, kind, default", DOCUMENTED,
    ids=[f"{row[0].__qualname__}-{row[1]}" for row in DOCUMENTED])
def test_documented_parameter(function, name, kind, default):
    parameters = inspect.signature(function).parameters
    assert name in parameters, f"{name} not in {list(parameters)}"
    if kind is not None:
        assert parameters[name].kind == kind
    if default is not _EMPTY:
        assert parameters[name].default == default


def test_message_ack_takes_no_arguments():
    parameters = list(inspect.signature(mqs.Message.ack).parameters)
    assert parameters == ["self"]


# ---- Broker options ---------------------------------------------------------

def _backend_classes():
    """Return {backend name: the class that takes its options}."""
    from mqs.broker._log_shared import SharedLogBackend
    from mqs.broker._memory import MemoryBackend
    from mqs.broker._redis import RedisBackend
    from mqs.broker._shm import ShmBackend

    return {"memory": MemoryBackend, "shm": ShmBackend,
            "log": SharedLogBackend, "redis": RedisBackend}


def _accepted_options(factory):
    """Return {name: default} of the keyword options `factory` takes."""
    parameters = inspect.signature(factory).parameters.values()
    return {parameter.name: parameter.default for parameter in parameters
            if parameter.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                      inspect.Parameter.VAR_KEYWORD)}


def _broker_doc_sections():
    """Split help(mqs.Broker)'s docstring into the text of the
    ``**options`` entry and that of the Other Parameters section."""
    doc = inspect.getdoc(mqs.Broker)
    options_start = doc.index("\n**options\n")
    other_start = doc.index("\nOther Parameters\n----------------\n")
    other_end = other_start + len("\nOther Parameters\n----------------\n")
    return doc[options_start:other_start], doc[other_end:]


def _documented_backends():
    """Return {backend: {option: required}} from the ``**options`` list."""
    options_text, _ = _broker_doc_sections()
    bullets = re.findall(r'- ``"(\w+)"``: (.*?)(?=\n\s*- ``|\Z)',
                         options_text, flags=re.DOTALL)
    return {backend: {name: bool(required) for name, required
                      in re.findall(r"`(\w+)`( \(required\))?", text)}
            for backend, text in bullets}


def _documented_options():
    """Return {option: (default, description)} from Other Parameters.
    The default is inspect.Parameter.empty where none is written."""
    _, other_text = _broker_doc_sections()
    options = {}
    name = None
    for line in other_text.splitlines():
        header = re.fullmatch(r"(\w+) : (.+)", line)
        if header:
            name = header.group(1)
            _, found, default_text = header.group(2).rpartition(", default ")
            default = ast.literal_eval(default_text) if found else _EMPTY
            options[name] = (default, "")
        elif name is not None and line.strip():
            default, description = options[name]
            options[name] = (default, f"{description} {line.strip()}")
    return options


def test_broker_doc_lists_every_backend():
    assert set(_documented_backends()) == set(_broker.BACKENDS)
    assert set(_backend_classes()) == set(_broker.BACKENDS)


@pytest.mark.parametrize("backend", sorted(_broker.BACKENDS))
def test_broker_doc_options_match_backend(backend):
    documented = _documented_backends()[backend]
    accepted = _accepted_options(_backend_classes()[backend])
    assert sorted(documented) == sorted(accepted)
    required = {name for name, default in accepted.items()
                if default is _EMPTY}
    assert {name for name, flag in documented.items() if flag} == required


@pytest.mark.parametrize("backend", ["memory", "shm", "log"])
def test_broker_factory_takes_class_options(backend):
    # Broker calls BACKENDS[backend]. The redis entry forwards **options
    # to RedisBackend, which the test above covers.
    factory_options = _accepted_options(_broker.BACKENDS[backend])
    class_options = _accepted_options(_backend_classes()[backend])
    assert factory_options == class_options


def test_broker_doc_describes_every_option():
    options = _documented_options()
    used = set().union(*(set(names) for names
                         in _documented_backends().values()))
    assert set(options) == used
    for name, (_, description) in options.items():
        assert description, f"{name} has no description"


@pytest.mark.parametrize("backend", sorted(_broker.BACKENDS))
def test_broker_doc_defaults_match_backend(backend):
    options = _documented_options()
    accepted = _accepted_options(_backend_classes()[backend])
    for name, default in accepted.items():
        assert options[name][0] == default, (
            f"{name}: documented default {options[name][0]!r}, "
            f"{backend} backend default {default!r}")


def test_help_broker_shows_backend_options():
    rendered = pydoc.render_doc(mqs.Broker, renderer=pydoc.plaintext)
    assert "Other Parameters" in rendered
    assert 'fsync : {"interval", "always", "never"}, default "interval"' \
        in rendered
    assert "journal_bytes : int, default 16777216" in rendered
