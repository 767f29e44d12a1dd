"""The value codec between a test and a solution, and the scorer's input checks: pure functions, no process started.

Only plain data may cross from a solution to its test: exact built-in types (never a subclass, whose `__eq__` could
say yes to everything), the dataset's helper classes rebuilt on the trusted side, size limits, no cycles; decoding
builds fresh objects from a flat list of nodes, so malformed or hostile input fails with CodecError, never anything
else.
"""

from __future__ import annotations

import json
import math

import pytest

from trl_qrpo._sandbox_harness import (
    MAX_DEPTH,
    CodecError,
    _solution_object_class,
    decode_value,
    encode_value,
)
from trl_qrpo.rewards import make_code_pass_rate
from trl_qrpo.sandbox import MAX_TEST_CHARS, CodeSandboxConfig, split_tests

LIMITS = {"max_nodes": 100_000, "max_bytes": 1_000_000}


def no_objects(obj):
    return None


def no_make(name, fields):
    raise CodecError(f"no class {name}")


def roundtrip(value, object_class=no_objects, make_object=no_make):
    nodes = encode_value(value, object_class, **LIMITS)
    # what crosses is JSON: the decoder sees it after a trip through text
    nodes = json.loads(json.dumps(nodes))
    return decode_value(nodes, make_object, LIMITS["max_nodes"])


def same(a, b) -> bool:
    """Equal, and of the very same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


PLAIN = [
    None,
    True,
    False,
    0,
    -1,
    2**200,
    -(10**5000),  # beyond int's 4300-digit str limit: sent in hex
    1.5,
    -0.0,
    float("inf"),
    float("nan"),
    1e-300,
    3 + 4j,
    "",
    "héllo \x00 \ud800",  # a lone surrogate is a str too
    b"\x00\xff",
    [1, [2, [3]], ()],
    (1, "a", None),
    {"a": 1, 2: [3], (4, 5): {6}},
    {1, 2, 3},
    frozenset({"x"}),
    [True, 1, 1.0],  # bool, int and float stay apart
]


@pytest.mark.parametrize("value", PLAIN, ids=[f"{type(v).__name__}{i}" for i, v in enumerate(PLAIN)])
def test_plain_values_roundtrip_with_exact_types(value):
    assert same(roundtrip(value), value)


def test_shared_parts_stay_shared_and_depth_is_bounded():
    inner = [0]
    out = roundtrip([inner, inner])
    assert out[0] is out[1]

    def nested(levels):
        deep = current = []
        for _ in range(levels):
            current.append([])
            current = current[0]
        return deep

    out = roundtrip(nested(MAX_DEPTH - 1))  # far deeper than the recursion limit: encoding and decoding are loops
    for _ in range(MAX_DEPTH - 1):
        out = out[0]
    assert out == []
    with pytest.raises(CodecError, match="levels deep"):
        roundtrip(nested(MAX_DEPTH + 1))  # hashing or comparing it would recurse in C


def test_std_mappings_cross_as_the_dict_they_equal():
    import collections

    def solution_side(obj):
        return _solution_object_class(obj)

    value = [collections.Counter("aab"), {"k": collections.defaultdict(int, x=1)}, collections.OrderedDict(a=1)]
    out = roundtrip(value, solution_side)
    assert same(out, [{"a": 2, "b": 1}, {"k": {"x": 1}}, {"a": 1}])
    with pytest.raises(CodecError, match="not plain data"):
        encode_value(collections.deque([1]), solution_side, **LIMITS)  # deque([1]) != [1] in Python: refused


class AlwaysEqual:
    def __eq__(self, other):
        return True


class EqInt(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


class EqStr(str):
    def __eq__(self, other):
        return True

    __hash__ = str.__hash__


class EqList(list):
    def __eq__(self, other):
        return True


@pytest.mark.parametrize(
    "value",
    [AlwaysEqual(), EqInt(3), EqStr("x"), EqList([1]), [1, EqInt(2)], {"k": EqStr("v")}, (x for x in ()), len],
    ids=[
        "object",
        "int-subclass",
        "str-subclass",
        "list-subclass",
        "nested-int",
        "nested-str",
        "generator",
        "builtin",
    ],
)
def test_what_is_not_plain_data_is_refused(value):
    with pytest.raises(CodecError, match="not plain data"):
        encode_value(value, no_objects, **LIMITS)


def test_cycles_and_size_limits():
    cyclic = [1]
    cyclic.append(cyclic)
    with pytest.raises(CodecError, match="cyclic"):
        encode_value(cyclic, no_objects, **LIMITS)
    d = {}
    d["self"] = d
    with pytest.raises(CodecError, match="cyclic"):
        encode_value(d, no_objects, **LIMITS)
    with pytest.raises(CodecError, match="larger than"):
        encode_value("x" * 2_000_000, no_objects, **LIMITS)
    with pytest.raises(CodecError, match="more than"):
        encode_value(list(range(200_000)), no_objects, max_nodes=100_000, max_bytes=10**9)
    with pytest.raises(CodecError):
        decode_value([["n"]] * 200_001, no_make, 200_000)


@pytest.mark.parametrize(
    "nodes",
    [
        [],
        "x",
        [["l", [0]]],  # a node pointing at itself: a cycle cannot be written
        [["n"], ["l", [1]]],  # ... nor a forward reference
        [["i", "zz"]],
        [["b", 1]],  # 1 is not a bool
        [["s", 5]],
        [["f", "1.0.0"]],
        [["q"]],
        [["l", [0.5]]],
        [["l", []], ["S", [0]]],  # a list in a set: unhashable
        [["n"], ["o", "ListNode", ["__class__", 0]]],  # dunder fields are refused
        [["n"], ["o", "Unknown", ["val", 0]]],
        [["d", [0]]],
        [[]],
    ],
)
def test_malformed_input_is_a_codec_error(nodes):
    with pytest.raises(CodecError):
        decode_value(nodes, no_make, 1000)


class ListNode:
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next


def test_helper_classes_are_rebuilt_field_wise():
    head = None
    for v in reversed(range(5000)):  # a long linked list: depth is no problem
        head = ListNode(v, head)

    def object_class(obj):
        return "ListNode" if type(obj) is ListNode else None

    made = []

    def make_object(name, fields):
        assert name == "ListNode"
        obj = object.__new__(ListNode)
        for k, v in fields:
            setattr(obj, k, v)
        made.append(obj)
        return obj

    out = roundtrip(head, object_class, make_object)
    values = []
    while out is not None:
        assert type(out) is ListNode
        values.append(out.val)
        out = out.next
    assert values == list(range(5000)) and len(made) == 5000


def test_huge_or_deep_test_expression_is_refused_naming_the_row():
    reward = make_code_pass_rate(CodeSandboxConfig(backend="subprocess"))
    good = "def check(candidate):\n    assert candidate(1) == 1\n"
    deep = "def check(candidate):\n    assert candidate(" + "(" * 50_000 + "1" + ")" * 50_000 + ") == 1\n"
    huge = "def check(candidate):\n" + "    assert candidate(1) == 1\n" * (MAX_TEST_CHARS // 20)
    for bad in (deep, huge):
        with pytest.raises(ValueError, match=r"Column 'test', row 1 .*fix or drop this row"):
            reward.programs(["```python\ndef f(x): return x\n```"] * 2, test=[good, bad], entry_point=["f", "f"])
    assert len(split_tests(good)) == 1


def test_config_validates_new_fields():
    for name in ("max_disk_mb", "max_value_mb", "max_value_parts"):
        with pytest.raises(ValueError, match=name):
            CodeSandboxConfig(**{name: 0})
    with pytest.raises(ValueError, match="num_workers"):
        CodeSandboxConfig(num_workers=10_000)
    assert CodeSandboxConfig.from_env({"TRL_QRPO_SANDBOX_MAX_DISK_MB": "8"}).max_disk_mb == 8
