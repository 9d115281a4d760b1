"""Every reference in the code points at something a reader of the repository can open: ``[impl N]``
at a section of docs/official_implementation.md (1-12) or docs/official_implementation_2.md
(13-25), and ``§`` only at a paper's section."""
import re
import subprocess

import pytest

from conftest import ROOT

DOCS = ("docs/official_implementation.md", "docs/official_implementation_2.md")
IMPL = re.compile(r"\[impl ([^\]]+)\]")


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    sources = (".py", ".md", ".yaml", ".sh")
    return [f for f in out.split() if f.endswith(sources) and f not in (*DOCS, "tests/test_docs.py")]


def _doc_targets():
    """{"9.4", "24.10", "19 row 2", ...}: the sections, checklist items and table rows of the document."""
    text = ""
    for doc in DOCS:
        with open(f"{ROOT}/{doc}") as f:
            text += f.read()
    targets = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", text, re.M))
    checklist = text[text.index("\n## 24."):text.index("\n## 25.")]
    targets |= {f"24.{n}" for n in re.findall(r"^(\d+)\. ", checklist, re.M)}
    table = text[text.index("\n## 19."):text.index("\n## 20.")]
    targets |= {f"19 row {n}" for n in re.findall(r"^\| (\d+) \|", table, re.M)}
    return targets


def test_the_document_has_every_section_and_checklist_item():
    targets = _doc_targets()
    assert {str(n) for n in range(1, 26)} <= targets
    assert {f"24.{n}" for n in range(1, 31)} <= targets and {f"19 row {n}" for n in range(1, 11)} <= targets


def test_every_impl_reference_resolves():
    targets, broken = _doc_targets(), []
    for path in _tracked_files():
        with open(f"{ROOT}/{path}") as f:
            for number, line in enumerate(f, 1):
                for group in IMPL.findall(line):  # "9.4", "16.1 step 7, 24.14", "19 row 2", "N"
                    for ref in group.split(", "):
                        ref = re.sub(r" steps? [\d-]+$", "", ref)
                        if ref not in targets and ref != "N":
                            broken.append(f"{path}:{number}: [impl {group}]")
    assert not broken, broken


def test_section_signs_cite_papers_only():
    stray = []
    for path in _tracked_files():
        with open(f"{ROOT}/{path}") as f:
            for number, line in enumerate(f, 1):
                if re.search(r"(?<!paper )§", line):
                    stray.append(f"{path}:{number}: {line.strip()}")
    assert not stray, stray
