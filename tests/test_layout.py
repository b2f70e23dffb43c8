"""The repo's layout as a specification: what sits at the root, which way imports run, that every runnable file
answers --help, and that the requirement files install what the code and the tests import."""
import ast
import importlib
import importlib.metadata
import re
import sys

import pytest

from conftest import REPO

SCRIPTS = ["train.py", "sample.py", "prepare.py"]
TOOLS = ["tools/evaluate.py", "tools/interpret.py", "tools/bench.py", "tools/export.py", "tools/plot.py"]


def imported_modules(path) -> set:
    """The top-level names of every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def python_files(folder="."):
    return sorted(p for p in (REPO / folder).rglob("*.py") if ".git" not in p.parts)


def test_the_root_holds_the_model_and_the_three_scripts_only():
    assert sorted(p.name for p in REPO.glob("*.py")) == sorted(["model.py", *SCRIPTS])


def test_model_py_imports_nothing_of_the_repo():
    ours = {p.stem for p in REPO.glob("*.py")} | {"tinygpt", "tools", "configs", "tests"}
    assert imported_modules(REPO / "model.py") & ours == set()
    assert "scaled_dot_product_attention" in (REPO / "model.py").read_text()  # called there, where a reader looks


@pytest.mark.parametrize("path", python_files("tinygpt"), ids=lambda p: p.name)
def test_the_package_imports_no_script_and_no_tool(path):
    assert imported_modules(path) & {"train", "sample", "prepare", "tools"} == set()


@pytest.mark.parametrize("script", SCRIPTS + TOOLS)
def test_every_script_and_tool_explains_itself_with_help(script, capsys):
    """In-process, for speed: the tests of each tool also run it as the README does (python -m tools.X)."""
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    assert module.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: ") and "--" in out and err == ""


def requirement_names(file) -> set:
    names = set()
    for line in (REPO / file).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(line[3:].strip())
        elif line:
            names.add(re.split(r"[<>=!~\[ ]", line)[0].lower().replace("_", "-"))
    return names


@pytest.mark.parametrize("files, requirements", [(lambda: python_files("tests"), "requirements-test.txt"),
                                                 (lambda: [p for p in python_files() if "tests" not in p.parts],
                                                  "requirements.txt")], ids=["tests", "code"])
def test_the_requirement_files_install_every_third_party_import(files, requirements):
    local = {p.stem for p in python_files()} | {"tinygpt", "tools"}
    distributions = importlib.metadata.packages_distributions()
    missing = set()
    for path in files():
        for name in imported_modules(path) - set(sys.stdlib_module_names) - local:
            wanted = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
            if not wanted & requirement_names(requirements):
                missing.add(f"{name} (imported by {path.relative_to(REPO)})")
    assert not missing, f"not in {requirements}: {sorted(missing)}"
