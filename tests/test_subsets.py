import re
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from ppg.subsets import (
    CustomMask,
    Discounted,
    FullPlanning,
    Greedy,
    KStepLookahead,
    RewardSubset,
    Segment,
    subset_from_name,
)

NS = range(1, 7)


def table(text: str) -> torch.Tensor:
    """Parse rows of 'x'/'.' into a bool matrix."""
    rows = [line.split() for line in text.strip().splitlines()]
    return torch.tensor([[c == "x" for c in row] for row in rows])


def reference_mask(n: int, members) -> torch.Tensor:
    """Bool [n, n] from a set definition: members(t, n) -> set of i in S_t."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for t in range(n):
        for i in members(t, n):
            m[t, i] = True
    return m


# ---- literal tables -----------------------------------------------------------------------

# fmt: off
LITERAL = [
    (FullPlanning(), 1, "x"),
    (Greedy(), 1, "x"),
    (KStepLookahead(3), 1, "x"),
    (Segment(length=2), 1, "x"),
    (FullPlanning(), 4, """
        x x x x
        . x x x
        . . x x
        . . . x
    """),
    (Greedy(), 4, """
        x . . .
        . x . .
        . . x .
        . . . x
    """),
    (KStepLookahead(2), 5, """
        x x . . .
        . x x . .
        . . x x .
        . . . x x
        . . . . x
    """),
    (KStepLookahead(3), 6, """
        x x x . . .
        . x x x . .
        . . x x x .
        . . . x x x
        . . . . x x
        . . . . . x
    """),
    (KStepLookahead(7), 3, """
        x x x
        . x x
        . . x
    """),
    # length 2 does not divide 5: the last segment is {4}
    (Segment(length=2), 5, """
        x x . . .
        . x . . .
        . . x x .
        . . . x .
        . . . . x
    """),
    # length 4 does not divide 6: segments {0..3}, {4, 5}
    (Segment(length=4), 6, """
        x x x x . .
        . x x x . .
        . . x x . .
        . . . x . .
        . . . . x x
        . . . . . x
    """),
    (Segment(boundaries=[0, 3]), 5, """
        x x x . .
        . x x . .
        . . x . .
        . . . x x
        . . . . x
    """),
    (Segment(boundaries=[0, 1, 4]), 6, """
        x . . . . .
        . x x x . .
        . . x x . .
        . . . x . .
        . . . . x x
        . . . . . x
    """),
    (Discounted(0.5), 3, """
        x x x
        . x x
        . . x
    """),
    (CustomMask([[1, 0, 0.5], [0, 0, 1], [0, 0, 1]]), 3, """
        x . x
        . . x
        . . x
    """),
]
# fmt: on


@pytest.mark.parametrize("subset,n,expected", LITERAL, ids=lambda x: repr(x)[:30])
def test_mask_literal_tables(subset, n, expected):
    m = subset.mask(n)
    assert m.dtype == torch.bool and m.shape == (n, n)
    assert torch.equal(m, table(expected)), f"{subset!r} n={n}\n{subset.ascii(n)}"


# ---- structural identities for every n ----------------------------------------------------


@pytest.mark.parametrize("n", NS)
def test_masks_match_set_definitions(n):
    full = reference_mask(n, lambda t, n: range(t, n))
    greedy = reference_mask(n, lambda t, n: {t})
    assert torch.equal(FullPlanning().mask(n), full)
    assert torch.equal(Greedy().mask(n), greedy)
    assert torch.equal(KStepLookahead(1).mask(n), greedy)
    for k in range(1, n + 3):
        expected = reference_mask(n, lambda t, n, k=k: range(t, min(t + k, n)))
        assert torch.equal(KStepLookahead(k).mask(n), expected), (n, k)
        if k >= n:
            assert torch.equal(KStepLookahead(k).mask(n), full), (n, k)
    for length in range(1, n + 2):
        expected = reference_mask(n, lambda t, n, L=length: range(t, min((t // L + 1) * L, n)))
        assert torch.equal(Segment(length=length).mask(n), expected), (n, length)
    assert torch.equal(Segment(length=1).mask(n), greedy)
    assert torch.equal(Segment(length=n).mask(n), full)
    assert torch.equal(Segment(boundaries=[0]).mask(n), full)
    assert torch.equal(Segment(boundaries=list(range(n))).mask(n), greedy)
    assert torch.equal(Discounted(0.3).mask(n), full)
    assert torch.equal(Discounted(1.0).weights(n), full.float())


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize(
    "subset",
    [
        FullPlanning(),
        Greedy(),
        KStepLookahead(2),
        KStepLookahead(4),
        Segment(length=3),
        Segment(boundaries=[0]),
        Discounted(0.8),
    ],
    ids=repr,
)
def test_mask_is_upper_triangular_with_diagonal(subset, n):
    m = subset.mask(n)
    assert not m.tril(-1).any()
    assert m.diagonal().all()  # every built-in class credits a turn with its own reward
    w = subset.weights(n)
    assert w.dtype == torch.float32 and w.shape == (n, n)
    assert torch.equal(w != 0, m)


def test_set_class_weights_are_mask_float():
    for subset in [FullPlanning(), Greedy(), KStepLookahead(3), Segment(length=2)]:
        assert torch.equal(subset.weights(5), subset.mask(5).float())


# ---- credit -------------------------------------------------------------------------------


def test_credit_set_classes():
    r = torch.tensor([[1.0, 2.0, 4.0, 8.0], [0.5, 0.0, 0.0, -1.0]])
    assert torch.equal(
        FullPlanning().credit(r), torch.tensor([[15.0, 14, 12, 8], [-0.5, -1, -1, -1]])
    )
    assert torch.equal(Greedy().credit(r), r)
    assert torch.equal(
        KStepLookahead(2).credit(r), torch.tensor([[3.0, 6, 12, 8], [0.5, 0, -1, -1]])
    )
    assert torch.equal(
        Segment(boundaries=[0, 2]).credit(r), torch.tensor([[3.0, 2, 12, 8], [0.5, 0, -1, -1]])
    )


def test_credit_discounted_hand_example():
    r = torch.tensor([[1.0, 2.0, 4.0]])
    # t=0: 1 + 0.5*2 + 0.25*4 = 3; t=1: 2 + 0.5*4 = 4; t=2: 4
    assert torch.allclose(Discounted(0.5).credit(r), torch.tensor([[3.0, 4.0, 4.0]]))
    w = Discounted(0.9).weights(4)
    assert w[0, 3].item() == pytest.approx(0.9**3)
    assert w[1, 2].item() == pytest.approx(0.9)
    assert w[2, 1].item() == 0.0


def test_credit_custom_mask_hand_example():
    c = CustomMask(torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 1.0], [0.0, 0.0, 0.0]]))
    r = torch.tensor([[1.0, 10.0, 100.0], [2.0, 0.0, 4.0]])
    assert torch.allclose(c.credit(r), torch.tensor([[51.0, 120.0, 0.0], [4.0, 4.0, 0.0]]))
    assert torch.equal(c.mask(3), table("x . x\n. x x\n. . ."))
    assert c.credit(r.double()).dtype == torch.float64


# ---- names and parsing --------------------------------------------------------------------


def test_names():
    assert FullPlanning().name == "full"
    assert Greedy().name == "greedy"
    assert KStepLookahead(3).name == "k3"
    assert Segment(length=2).name == "segment"
    assert Segment(boundaries=[0, 2]).name == "segment"
    assert Discounted(0.9).name == "discounted0.9"
    assert CustomMask([[1.0]]).name == "custom"


@pytest.mark.parametrize(
    "name,expected",
    [
        ("full", FullPlanning()),
        ("greedy", Greedy()),
        ("k3", KStepLookahead(3)),
        ("k1", KStepLookahead(1)),
        ("segment2", Segment(length=2)),
        ("discounted0.9", Discounted(0.9)),
        ("discounted1", Discounted(1.0)),
    ],
)
def test_subset_from_name(name, expected):
    assert subset_from_name(name) == expected


@pytest.mark.parametrize("name", ["", "fullplanning", "k", "kx", "segment", "disc0.9", "custom"])
def test_subset_from_name_unknown(name):
    with pytest.raises(ValueError, match="valid forms: full, greedy, k<K>"):
        subset_from_name(name)


def test_subset_from_name_bad_values():
    with pytest.raises(ValueError, match="k=0"):
        subset_from_name("k0")
    with pytest.raises(ValueError, match="gamma=1.5"):
        subset_from_name("discounted1.5")


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: KStepLookahead(0), r"KStepLookahead: k must be an int >= 1, got k=0"),
        (lambda: KStepLookahead(-2), r"k=-2"),
        (lambda: KStepLookahead(1.5), r"k=1.5"),
        (lambda: Discounted(0.0), r"Discounted: gamma must be in \(0, 1\], got gamma=0.0"),
        (lambda: Discounted(1.01), r"gamma=1.01"),
        (lambda: Discounted(float("nan")), r"gamma=nan"),
        (lambda: Segment(), r"Segment: give exactly one of length or boundaries"),
        (lambda: Segment(length=2, boundaries=[0, 2]), r"exactly one of length or boundaries"),
        (lambda: Segment(length=0), r"length=0"),
        (lambda: Segment(boundaries=[1, 3]), r"boundaries=\[1, 3\]"),
        (lambda: Segment(boundaries=[0, 2, 2]), r"strictly increasing, got boundaries=\[0, 2, 2\]"),
        (lambda: Segment(boundaries=[0, 3, 1]), r"boundaries=\[0, 3, 1\]"),
        (lambda: Segment(boundaries=[]), r"boundaries=\[\]"),
        (lambda: CustomMask([[1.0, 1.0]]), r"CustomMask: matrix must be square"),
        (lambda: CustomMask([1.0, 1.0]), r"matrix must be square"),
        (
            lambda: CustomMask([[1.0, 0.0], [1.0, 1.0]]),
            r"matrix must be upper-triangular.*\[1, 0\]",
        ),
        (lambda: CustomMask([[float("nan")]]), r"matrix must be finite"),
    ],
)
def test_constructor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_mask_time_validation():
    with pytest.raises(
        ValueError, match=r"boundaries must all be < n_turns=4, got boundaries=\[0, 4\]"
    ):
        Segment(boundaries=[0, 4]).mask(4)
    Segment(boundaries=[0, 4]).mask(5)
    with pytest.raises(
        ValueError, match=r"CustomMask: n_turns must equal the matrix size 2, got n_turns=3"
    ):
        CustomMask([[1, 1], [0, 1]]).mask(3)
    with pytest.raises(ValueError, match="n_turns=3"):
        CustomMask([[1, 1], [0, 1]]).credit(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="n_turns=0"):
        FullPlanning().mask(0)
    with pytest.raises(ValueError, match="rewards must be"):
        Greedy().credit(torch.zeros(3))


# ---- YAML / jsonargparse ------------------------------------------------------------------


def _instantiate(parser):
    # `instantiate` replaced `instantiate_classes` in jsonargparse 4.49
    return getattr(parser, "instantiate", None) or parser.instantiate_classes


def _parse(value):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--subset", type=RewardSubset)
    cfg = parser.parse_object({"subset": value})
    return _instantiate(parser)(cfg).subset


def test_jsonargparse_instantiation():
    s = _parse({"class_path": "ppg.subsets.KStepLookahead", "init_args": {"k": 3}})
    assert isinstance(s, KStepLookahead) and s.k == 3 and s.name == "k3"
    assert _parse({"class_path": "ppg.subsets.Greedy"}) == Greedy()
    assert _parse({"class_path": "ppg.subsets.Segment", "init_args": {"boundaries": [0, 2]}}) == (
        Segment(boundaries=[0, 2])
    )
    assert _parse({"class_path": "ppg.subsets.Segment", "init_args": {"length": 3}}) == (
        Segment(length=3)
    )
    assert _parse({"class_path": "ppg.subsets.Discounted", "init_args": {"gamma": 0.9}}).name == (
        "discounted0.9"
    )
    custom = _parse(
        {"class_path": "ppg.subsets.CustomMask", "init_args": {"matrix": [[1, 0.5], [0, 1]]}}
    )
    assert torch.equal(custom.weights(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))


def test_jsonargparse_from_yaml_string():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--subset", type=RewardSubset)
    cfg = parser.parse_string(
        "subset:\n  class_path: ppg.subsets.KStepLookahead\n  init_args: {k: 2}\n"
    )
    assert _instantiate(parser)(cfg).subset == KStepLookahead(2)


def test_docs_pictures_are_real_output():
    doc = Path(__file__).resolve().parents[1] / "docs" / "policy_classes.md"
    if not doc.exists():
        pytest.skip("docs/policy_classes.md not present")
    text = doc.read_text()
    for subset in [FullPlanning(), Greedy(), KStepLookahead(3), Segment(length=3)]:
        assert subset.ascii(5) in text, subset


# ---- layering -----------------------------------------------------------------------------


def test_core_modules_are_pure_torch():
    root = Path(__file__).resolve().parents[1] / "ppg"
    for name in ["subsets.py", "objective.py"]:
        src = (root / name).read_text()
        bad = re.findall(
            r"^\s*(?:import|from)\s+(lightning|pytorch_lightning|transformers)\b", src, re.MULTILINE
        )
        assert not bad, f"{name} imports {bad}"
