"""The repo's layout as a specification: what sits at the root, which way imports run (the floors
below), that every runnable file answers --help, that lines stay short, and that the requirement
files install what the code and the tests import."""
import ast
import importlib
import importlib.metadata
import re
import sys

import pytest

from conftest import REPO

SCRIPTS = ["train.py", "sample.py", "prepare.py"]
TOOLS = ["tools/evaluate.py", "tools/interpret.py", "tools/bench.py", "tools/export.py",
         "tools/plot.py"]


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


# The written architecture: every module on its floor, and every import, at the top of a file or
# inside a function, goes to a lower floor. Nothing imports sideways or up, so there is no circle,
# and reading batches (data.py) never imports the data builders (datasets.py, corpus.py).
FLOORS = {
    1: ["model", "tinygpt.common", "tinygpt.muon"],
    2: ["tinygpt.device", "tinygpt.tokenizer", "tinygpt.download", "tinygpt.plot", "tinygpt.gpt2",
        "tinygpt.parallel", "tinygpt.chat"],
    3: ["tinygpt.data", "tinygpt.checkpoint", "tinygpt.evaluation", "tinygpt.optim",
        "tinygpt.datasets", "tinygpt.corpus", "tinygpt.hellaswag"],
    4: ["train", "sample", "prepare", "tools"],
}
FLOOR_OF = {name: floor for floor, names in FLOORS.items() for name in names}


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return "tools" if parts[0] == "tools" else ".".join(parts)


def repo_imports(path) -> set:
    """The repo's modules that a file imports, as FLOORS names them."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {"tools" if n.startswith("tools") else n for n in names if n in FLOOR_OF
            or n.startswith("tools.")}


CODE = [p for p in python_files() if not {"tests", "configs"} & set(p.relative_to(REPO).parts)]


def test_every_module_has_a_floor():
    assert sorted({module_name(p) for p in CODE} - set(FLOOR_OF)) == []


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_every_import_goes_down_a_floor(path):
    here = FLOOR_OF[module_name(path)]
    for name in repo_imports(path) - {module_name(path)}:
        assert FLOOR_OF[name] < here, f"{module_name(path)} (floor {here}) imports {name} " \
                                      f"(floor {FLOOR_OF[name]})"


def test_reading_batches_never_imports_the_data_builders():
    assert not repo_imports(REPO / "tinygpt" / "data.py") & {"tinygpt.datasets", "tinygpt.corpus"}


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_at_most_five_percent_of_a_files_lines_are_over_100_characters(path):
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    long = [n for n, line in enumerate(lines, 1) if len(line) > 100]
    assert len(long) <= 0.05 * len(lines), f"{len(long)} of {len(lines)} lines are long"


def test_the_root_holds_the_model_and_the_three_scripts_only():
    assert sorted(p.name for p in REPO.glob("*.py")) == sorted(["model.py", *SCRIPTS])


def test_model_py_imports_nothing_of_the_repo():
    ours = {p.stem for p in REPO.glob("*.py")} | {"tinygpt", "tools", "configs", "tests"}
    assert imported_modules(REPO / "model.py") & ours == set()
    # Called there, where a reader looks.
    assert "scaled_dot_product_attention" in (REPO / "model.py").read_text()


@pytest.mark.parametrize("path", python_files("tinygpt"), ids=lambda p: p.name)
def test_the_package_imports_no_script_and_no_tool(path):
    assert imported_modules(path) & {"train", "sample", "prepare", "tools"} == set()


@pytest.mark.parametrize("script", SCRIPTS + TOOLS)
def test_every_script_and_tool_explains_itself_with_help(script, capsys):
    """In-process, for speed: the tests of each tool also run it as the README does
    (python -m tools.X)."""
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


def code_files():
    return [p for p in python_files() if "tests" not in p.parts]


@pytest.mark.parametrize("files, requirements",
                         [(lambda: python_files("tests"), "requirements-test.txt"),
                          (code_files, "requirements.txt")], ids=["tests", "code"])
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


def test_every_mutation_of_the_mutation_check_still_finds_its_code_and_its_tests():
    """tests/mutation_check.py breaks the code on purpose by exact text; after code moves, each
    anchor must still match once and each catching test must still exist."""
    import mutation_check
    assert mutation_check.problems() == []
