"""What every script and module shares: the errors that end a command with a one-line message,
durable file writes (a file appears whole or not at all), and typed `--key=value` options.

Each script declares its options as a dataclass whose fields carry a default and a trailing
`# comment`; `parse_options(SampleConfig, argv)` returns a checked instance. Values are Python
literals (`--lr=3e-4`, `--stop='\\n'`), strings may be bare (`--out_dir=out`), and a bare `--flag`
means True. Config files (train.py) are plain `name = value` lines, parsed and never executed.
Range checks live in each dataclass's `__post_init__`, so they run however it is built.
"""
import ast
import difflib
import inspect
import os
import re
import shutil
import sys
import tempfile
import types
import typing
from dataclasses import MISSING, asdict, fields
from pathlib import Path


class ConfigError(Exception):
    """An option or config file is wrong; the message says which and how to fix it."""


class DataError(Exception):
    """A data set is missing or cannot be built; the message says how to fix it."""


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not fit the requested model."""


class NonFiniteLossError(Exception):
    """Training produced a nan/inf loss; the run stops before it can save bad weights."""


# Under torchrun every process raises these together (from values all of them share, or through
# Dist.on_master and its siblings), so the job can leave its process group in order. Any other
# error is one process's own.
EVERY_PROCESS_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError)


def verdict_text(value, bar, higher_is_better=False, unit="") -> str:
    """' (bar B): PASS' when value reaches bar, ' (bar B): FAIL' when not; '' with no bar."""
    if not bar:
        return ""
    passed = value >= bar if higher_is_better else value <= bar
    return f" (bar {bar:g}{unit}): {'PASS' if passed else 'FAIL'}"


def atomic_write(path, write):
    """Call write(f) on a temporary file beside path, fsync it, then rename it over path.

    A crash or an exception inside write() leaves path as it was (or absent) and no temporary
    file behind; after the rename the folder is fsynced so the new name survives a power cut."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def keep_as(path, keep_path):
    """Make keep_path hold what path holds now, atomically and without a copy where the file
    system allows (a hard link): a later atomic_write to path leaves keep_path unchanged."""
    keep_path = Path(keep_path)
    tmp = keep_path.with_name(f".{keep_path.name}.{os.getpid()}.tmp")
    try:
        os.link(path, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, keep_path)


# ------------------------------------------------------------------ typed options

TYPE_NAMES = {int: "an int", float: "a float", bool: "True or False", str: "a string",
              type(None): "None"}


def accepted_types(field) -> tuple:
    """The types a field takes: its annotation, with `X | None` meaning X or None."""
    kind = field.type
    return typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)


def checked_value(field, value, where):
    """value as the field's type (an int is fine for a float), or a ConfigError naming both."""
    allowed = accepted_types(field)
    if float in allowed and type(value) is int:
        value = float(value)
    if type(value) not in allowed:  # `type(...) in`, so True is not taken for an int
        expected = " or ".join(TYPE_NAMES.get(t, t.__name__) for t in allowed)
        raise ConfigError(f"{where}{field.name} takes {expected}, got {value!r}; "
                          f"the default is {field.default!r}")
    return value


def unknown_key(name, known, where) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else "see --help for the options"
    return ConfigError(f"{where}unknown option '{name}'; {hint}")


def field_named(cls, name, where):
    by_name = {f.name: f for f in fields(cls)}
    if name not in by_name:
        raise unknown_key(name, list(by_name), where)
    return by_name[name]


def literal(text, field):
    """The value of `--name=text`: a Python literal, or the bare text for a string option."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word; fine for strings, reported by checked_value otherwise
    return text if str in accepted_types(field) and not isinstance(value, str) else value


def read_config_file(cls, path) -> dict:
    """{name: value} of a config file's `name = literal` lines. The file is parsed, never run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path} line {e.lineno}: not valid Python ({e.msg})") from None
    values = {}
    for node in tree.body:
        where = f"{path} line {node.lineno}: "
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        plain = isinstance(node, ast.Assign) and len(node.targets) == 1
        if not (plain and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{where}only `name = value` lines are allowed, "
                              f"got `{ast.unparse(node)}`")
        name = node.targets[0].id
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise ConfigError(f"{where}{name} must be a plain value (number, string, True/False), "
                              f"got `{ast.unparse(node.value)}`") from None
        values[name] = checked_value(field_named(cls, name, where), value, where)
    return values


def read_override(cls, arg) -> tuple:
    """(name, value) of one `--name=value` (or bare `--flag`) argument."""
    bare = arg.startswith("--") and "=" not in arg
    if bare and bool in accepted_types(field_named(cls, arg[2:], "")):
        arg += "=True"
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"cannot read argument {arg!r}; use --key=value (see --help)")
    name, text = arg[2:].split("=", 1)
    field = field_named(cls, name, f"--{name}: ")
    return name, checked_value(field, literal(text, field), f"--{name}={text}: ")


def parse_options(cls, argv, config_files=False):
    """cls built from argv: config files (if allowed) and `--key=value`, applied left to right."""
    values = {}
    for arg in argv:
        if not arg.startswith("--") and config_files:
            values.update(read_config_file(cls, arg))
        else:
            values.update([read_override(cls, arg)])
    try:
        return cls(**values)  # built once, so __post_init__ checks the final combination
    except ValueError as e:
        raise ConfigError(str(e)) from None


def must(condition, message):
    """The one-line range check that __post_init__ methods use."""
    if not condition:
        raise ConfigError(message)


def field_comments(cls) -> dict:
    """{field: the `# comment` after it} from the source of cls and its bases."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        for line in inspect.getsource(klass).splitlines():
            match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)", line)
            if match:
                comments[match.group(1)] = match.group(2)
    return comments


def help_text(cls, usage, description) -> str:
    comments = field_comments(cls)
    lines = [usage, "", description.strip(), "", "options (a bare --flag means True):"]
    for f in fields(cls):
        default = "" if f.default is MISSING else repr(f.default)
        lines.append(f"{f'  --{f.name}={default}':<36} {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def wants_help(argv) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)


def as_config_file(cfg) -> str:
    """The options as config-file lines: what a run prints can be saved and run again."""
    return "\n".join(f"{name} = {value!r}" for name, value in asdict(cfg).items())


def run_cli(cls, argv, usage, description, work, errors=()) -> int:
    """A script's main(): --help, argv parsed into cls, work(cfg); ConfigError and the listed errors
    end as one `error: ...` line on stderr and exit code 1."""
    if wants_help(argv):
        print(help_text(cls, usage, description))
        return 0
    try:
        work(parse_options(cls, argv))
    except (ConfigError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
