"""The documentation stays true to the code: CONTRIBUTING.md's excerpts exist in the files they
name, the README's families table is the registry's, and the public API has numpy docstrings."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import relprop
import relprop.text
from relprop import rules
from tests.conftest import load_script

families_module = importlib.import_module("relprop.registry")    # relprop.families is the function
ROOT = Path(__file__).resolve().parent.parent
FAMILIES_MARKDOWN = load_script(ROOT / "scripts" / "families_markdown.py")
EXCERPT = re.compile(r"<!-- excerpt: (?P<path>\S+) -->\n```python\n(?P<code>.*?)\n```", re.S)


def excerpts(text: str) -> list[tuple[str, str]]:
    """(path, code) of every block marked ``<!-- excerpt: PATH -->``."""
    return [(m["path"], m["code"]) for m in EXCERPT.finditer(text)]


def missing_chunk(code: str, source: str):
    """The first chunk of ``code`` (chunks are separated by ``...`` lines) that is not in
    ``source`` as consecutive lines, in order after the previous chunk; None if all are.
    Lines are compared without their indentation (an excerpt may be dedented), blank lines
    are ignored."""
    lines = [line.strip() for line in source.splitlines() if line.strip()]
    chunks, chunk = [], []
    for line in code.splitlines():
        if line.strip() == "...":
            chunks.append(chunk)
            chunk = []
        elif line.strip():
            chunk.append(line.strip())
    chunks.append(chunk)
    position = 0
    for chunk in filter(None, chunks):
        found = next((i for i in range(position, len(lines) - len(chunk) + 1)
                      if lines[i:i + len(chunk)] == chunk), None)
        if found is None:
            return "\n".join(chunk)
        position = found + len(chunk)
    return None


def test_contributing_excerpts_are_the_repositorys_code():
    found = excerpts((ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8"))
    # each of the four guides (family, rule set, method, benchmark) shows real code
    paths = {path for path, _ in found}
    assert {"src/relprop/registry.py", "tests/families/cases.py", "src/relprop/rules.py",
            "src/relprop/oprules.py", "src/relprop/attributions/rollout.py", "benchmarks/bench_vit.py"} <= paths
    for path, code in found:
        assert (ROOT / path).is_file(), f"CONTRIBUTING.md quotes {path}, which does not exist"
        chunk = missing_chunk(code, (ROOT / path).read_text(encoding="utf-8"))
        assert chunk is None, f"CONTRIBUTING.md's excerpt of {path} is no longer in it:\n{chunk}"


def test_excerpt_check_catches_changed_and_reordered_code():
    source = "def f(x):\n    y = x + 1\n    return y\n\n\ndef g():\n    pass\n"
    assert missing_chunk("y = x + 1\nreturn y", source) is None
    assert missing_chunk("def f(x):\n...\ndef g():", source) is None
    assert missing_chunk("y = x + 2\nreturn y", source) == "y = x + 2\nreturn y"
    assert missing_chunk("def g():\n...\ndef f(x):", source) == "def f(x):"      # order matters
    assert missing_chunk("y = x + 1\ndef g():", source) is not None               # not consecutive


def test_readme_families_section_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert FAMILIES_MARKDOWN.section(readme) == FAMILIES_MARKDOWN.markdown(), (
        "README.md's Supported families table is out of date: run "
        "PYTHONPATH=src python scripts/families_markdown.py --write")


def test_families_table_has_one_row_per_registered_family():
    table = FAMILIES_MARKDOWN.markdown().splitlines()
    assert len(table) == 2 + len(families_module.FAMILIES)
    for row, family in zip(table[2:], families_module.FAMILIES):
        assert row.startswith(f"| {family.name} |")
        assert all(f"`{name}`" in row for name in family.classes)
    headless = families_module.Family("Headless", ("SomeModel",), "text", logits=None, preset="text")
    assert "callable" in FAMILIES_MARKDOWN.markdown([headless]).splitlines()[2]


def test_families_section_replacement_keeps_the_rest_of_the_readme():
    text = f"intro\n{FAMILIES_MARKDOWN.START}\nold table\n{FAMILIES_MARKDOWN.END}\noutro\n"
    replaced = FAMILIES_MARKDOWN.replace_section(text, "| new |")
    assert FAMILIES_MARKDOWN.section(replaced) == "| new |"
    assert replaced.startswith("intro\n") and replaced.endswith("\noutro\n")
    with pytest.raises(SystemExit, match="markers"):
        FAMILIES_MARKDOWN.section("no markers here")


def test_families_function_is_public_and_the_registry_still_importable():
    from relprop.registry import FAMILIES

    # error messages tell users to call relprop.families()
    assert relprop.families() == families_module.families()
    assert [line.split(":")[0] for line in relprop.families()] == [f.name for f in FAMILIES]
    assert "BERT: BertForSequenceClassification" in relprop.families()


# -- numpy-style docstrings on the public API -------------------------------------------------
PUBLIC = [relprop.Explainer, relprop.Explainer.explain, relprop.Explainer.logits, relprop.Explainer.refresh,
          relprop.Explainer.class_index, relprop.Explainer.program, relprop.Explainer.modality,
          relprop.Explainer.labels, relprop.Explanation, relprop.Explanation.as_grid,
          relprop.Explanation.upsampled, relprop.Explanation.normalized, relprop.Internals, relprop.methods,
          relprop.normalize, relprop.families, families_module.Family, families_module.family_of,
          families_module.register_family, rules.RuleSet, rules.Preset, rules.get_rule_set,
          relprop.text.explain_generation, relprop.text.GenerationExplanation]


def _name(obj) -> str:
    return getattr(obj.fget if isinstance(obj, property) else obj, "__qualname__", repr(obj))


@pytest.mark.parametrize("obj", PUBLIC, ids=_name)
def test_public_api_has_numpy_docstrings(obj):
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{_name(obj)} has no docstring"
    if inspect.isclass(obj):
        fields = getattr(obj, "__dataclass_fields__", {})
        if fields:
            assert re.search(r"^(Parameters|Attributes)\n-{10}", doc, re.M), f"{_name(obj)}: no Parameters section"
            assert all(re.search(rf"^{name}\b", doc, re.M) for name in fields if not name.startswith("_")), (
                f"{_name(obj)}: not every field is described")
        return
    if isinstance(obj, property):
        return
    signature = inspect.signature(obj)
    parameters = [p for p in signature.parameters if p != "self"]
    if parameters:
        assert re.search(r"^Parameters\n-{10}", doc, re.M), f"{_name(obj)}: no Parameters section"
    if signature.return_annotation not in (None, "None", inspect.Signature.empty):
        assert re.search(r"^Returns\n-{7}", doc, re.M), f"{_name(obj)}: no Returns section"
