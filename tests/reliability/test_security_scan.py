"""Security, part 1: a scan of the source for anything that could run code from a file it reads.

Two checkers split the cases between them, each on every `.py` file of the repository outside `.venv`:

- ruff's flake8-bandit rules `RUFF_RULES` (selected in `pyproject.toml`, so `ruff check .` applies them,
  and run here on their own, so they hold whatever that selection says): the builtins `exec` (S102) and
  `eval` (S307); pickle, dill, shelve, jsonpickle and `pandas.read_pickle` loads (S301); marshal loads
  (S302); `yaml.load` without a safe Loader (S506); a literal truthy `shell=` in subprocess calls (S602) and
  in any other call (S604); `os.system`, `os.popen` and `subprocess.getoutput` (S605).
- the AST scanner below, for what those rules do not see: `torch.load` (or
  `torch.serialization.load`, `torch.hub.load_state_dict_from_url`, `load_from_checkpoint`, a Lightning
  `ckpt_path=` restore) without a literal `weights_only=True`, and `torch.hub.load`; `_pickle` and
  joblib loads, cloudpickle calls, dill calls other than `load`/`loads`/`Unpickler`, and subclasses of an
  `Unpickler`; `np.load(..., allow_pickle=True)`; `yaml.load_all` without a safe Loader,
  `yaml.unsafe_load`/`full_load` (and their `_all` forms); the builtin `compile` (not `torch.compile`)
  and `__import__` of a non-literal; a `shell=` whose value is not a literal; torch safe-globals beyond
  `argparse.Namespace`; webdataset decoders (`.decode()` on a pipeline, `wds.decode`, `autodecode`),
  which would unpickle `.pyd`/`.pth`/`.pickle` members.

Both are tested here on snippets of each pattern (reported) and of their safe equivalents (not reported),
and on each other's snippets, so that every case has one checker. Reviewed exceptions: `ALLOWED` for the
scanner (by file, rule and line text); for ruff a `# noqa: Sxxx  reason` on the line, each listed in
`RUFF_ALLOWED`. Behaviour with malicious files is `test_security_loading.py`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[2]
_SKIP_DIRS = {"build", "dist", "runs", "lightning_logs", "__pycache__", "node_modules", "site-packages"}

# ruff's flake8-bandit rules that cover cases of this scan (the scanner below leaves these cases to them).
RUFF_RULES = ("S102", "S301", "S302", "S307", "S506", "S602", "S604", "S605")

# Scanner: (path relative to the repo, rule, the flagged line's text) -> why this one use is safe.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("train/strategies.py", "torch-load",
     'checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)'):
        "the Trainer's weights_only, which python -m train sets to True unless the user passes --weights_only false",
}
# ruff: (path relative to the repo, code, the line's text up to its noqa comment) -> why this one use is safe.
RUFF_ALLOWED: dict[tuple[str, str, str], str] = {
    ("tests/engram_vision/test_hashing.py", "S102", "exec(_DIGEST_SCRIPT, namespace)"):
        "runs the test file's own constant script, to compare digests with a second process",
}

_TORCH_LOADS = {"torch.load", "torch.serialization.load", "torch.hub.load_state_dict_from_url"}
_ALWAYS = {  # calls that are unsafe whatever their arguments
    **dict.fromkeys(["_pickle.load", "_pickle.loads", "_pickle.Unpickler", "joblib.load"], "pickle"),
    "builtins.compile": "compile",
    **dict.fromkeys(["yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"],
                    "yaml-load"),
    "torch.hub.load": "torch-load",  # imports and runs the hub repository's hubconf.py
}
_PICKLE_MODULES = ("dill.", "cloudpickle.")  # every call of these, but for the ones S301 reports
_RUFF_S301 = {"dill.load", "dill.loads", "dill.Unpickler"}
_SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}
_SAFE_GLOBALS_CALLS = {"torch.serialization.add_safe_globals", "torch.serialization.safe_globals"}
# webdataset names whose use decodes members by extension (basichandlers unpickle .pyd/.pickle/.pth).
_WDS_DECODERS = {"decode", "xdecode", "autodecode", "Decoder", "basichandlers", "torch_loads",
                 "unpickle_loads", "decode_pickle", "default_decoders", "imagehandler"}


class Finding(NamedTuple):
    path: str
    line: int
    rule: str
    code: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.code}"


def _is(node: ast.expr | None, value: object) -> bool:
    """Whether `node` is the literal `value` (True, False, None)."""
    return isinstance(node, ast.Constant) and node.value is value


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


class _Scanner(ast.NodeVisitor):
    """Collects Findings in one module; names are resolved through the module's imports."""

    def __init__(self, tree: ast.Module, path: str, lines: list[str]) -> None:
        self.path, self.lines, self.found = path, lines, {}
        self.aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                    root = a.name.split(".")[0]
                    self.aliases[a.asname or root] = a.name if a.asname else root
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        self.pipelines = self._pipeline_names(tree)

    def qualname(self, node: ast.expr) -> str | None:
        """`np.load` -> 'numpy.load', `load` (from torch import load) -> 'torch.load'; None for non-names."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.qualname(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def _is_wds(self, node: ast.expr, names: set[str]) -> bool:
        """Whether `node` is a webdataset pipeline: calls chained on `webdataset.*` or on one of `names`."""
        while True:
            name = self.qualname(node)
            if name is not None and name.startswith("webdataset."):
                return True
            if isinstance(node, ast.Call):
                node = node.func
            elif isinstance(node, ast.Attribute):
                node = node.value
            else:
                return isinstance(node, ast.Name) and node.id in names

    def _pipeline_names(self, tree: ast.Module) -> set[str]:
        names: set[str] = set()
        assigns = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value]
        while True:  # to a fixed point: `ds = wds.WebDataset(u)`, then `ds = ds.shuffle(9)`, ...
            targets = [(t, n.value) for n in assigns
                       for t in (n.targets if isinstance(n, ast.Assign) else [n.target])]
            more = {t.id for t, value in targets if isinstance(t, ast.Name) and self._is_wds(value, names)}
            if more <= names:
                return names
            names |= more

    def flag(self, node: ast.AST, rule: str) -> None:
        code = self.lines[node.lineno - 1].strip() if node.lineno <= len(self.lines) else ""
        self.found.setdefault((node.lineno, rule), Finding(self.path, node.lineno, rule, code))

    def visit_Call(self, node: ast.Call) -> None:
        name = self.qualname(node.func)
        safe_load = _is(_keyword(node, "weights_only"), True)
        method = node.func.attr if isinstance(node.func, ast.Attribute) else None
        if name in _ALWAYS:
            self.flag(node, _ALWAYS[name])
        elif name and name.startswith(_PICKLE_MODULES) and name not in _RUFF_S301:
            self.flag(node, "pickle")
        elif name in _TORCH_LOADS or method == "load_from_checkpoint":
            if not safe_load:
                self.flag(node, "torch-load")
        elif name == "numpy.load":
            allow = _keyword(node, "allow_pickle")
            if len(node.args) >= 3 or (allow is not None and not _is(allow, False)):
                self.flag(node, "numpy-pickle")
        elif name == "yaml.load_all":  # yaml.load is S506
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or self.qualname(loader) not in _SAFE_YAML_LOADERS:
                self.flag(node, "yaml-load")
        elif name in _SAFE_GLOBALS_CALLS:
            allowed = node.args[0] if len(node.args) == 1 and not node.keywords else None
            if not (isinstance(allowed, (ast.List, ast.Tuple, ast.Set))
                    and all(self.qualname(e) == "argparse.Namespace" for e in allowed.elts)):
                self.flag(node, "safe-globals")
        elif isinstance(node.func, ast.Name) and node.func.id == "compile" and "compile" not in self.aliases:
            self.flag(node, "compile")  # eval and exec are S307 and S102
        elif name == "__import__" and not (node.args and isinstance(node.args[0], ast.Constant)):
            self.flag(node, "import")
        elif method == "decode" and self._is_wds(node.func.value, self.pipelines):
            self.flag(node, "wds-decode")
        ckpt = _keyword(node, "ckpt_path")  # a Lightning restore: trainer.fit/validate/test/predict
        if ckpt is not None and not _is(ckpt, None) and not safe_load:
            self.flag(node, "torch-load")
        shell = _keyword(node, "shell")  # a literal truthy shell= is S602/S604, a literal falsy one is safe
        if shell is not None and not isinstance(shell, ast.Constant):
            self.flag(node, "shell")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = self.qualname(node)
        if name and name.startswith("webdataset.") and _WDS_DECODERS & set(name.split(".")[1:]):
            self.flag(node, "wds-decode")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        name = self.aliases.get(node.id, "")
        if name.startswith("webdataset.") and _WDS_DECODERS & set(name.split(".")[1:]):
            self.flag(node, "wds-decode")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if any((self.qualname(b) or "").endswith("Unpickler") for b in node.bases):
            self.flag(node, "pickle")
        self.generic_visit(node)


def scan_source(source: str, path: str = "<snippet>") -> list[Finding]:
    """Unsafe calls in Python `source`, in line order."""
    tree = ast.parse(source, filename=path)
    scanner = _Scanner(tree, path, source.splitlines())
    scanner.visit(tree)
    return sorted(scanner.found.values(), key=lambda f: (f.line, f.rule))


def source_files(root: Path = REPO) -> list[Path]:
    """Every .py file under `root`, skipping hidden folders (.venv, .git), build and run outputs."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS
                         and not d.endswith(".egg-info") and not (Path(folder, d) / "pyvenv.cfg").exists())
        files += [Path(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


# --- the scanner finds each pattern and passes its safe equivalent ---------------------------------------

UNSAFE = {
    "import torch\ntorch.load(path)": "torch-load",
    "import torch\ntorch.load(path, map_location='cpu', weights_only=False)": "torch-load",
    "import torch\ntorch.load(path, **options)": "torch-load",
    "from torch import load\nload(path)": "torch-load",
    "import torch as T\nT.serialization.load(path, weights_only=flag)": "torch-load",
    "import torch\ntorch.hub.load_state_dict_from_url(url)": "torch-load",
    "import torch\ntorch.hub.load('owner/repo', 'model')": "torch-load",
    "LitAR.load_from_checkpoint(path)": "torch-load",
    "trainer.fit(module, data, ckpt_path='last')": "torch-load",
    "import pickle\nclass Strict(pickle.Unpickler):\n    pass": "pickle",
    "import _pickle\n_pickle.loads(blob)": "pickle",
    "from cloudpickle import load\nload(stream)": "pickle",
    "import joblib\njoblib.load(path)": "pickle",
    "import dill\ndill.load_session(path)": "pickle",
    "import numpy as np\nnp.load(path, allow_pickle=True)": "numpy-pickle",
    "import numpy\nnumpy.load(path, allow_pickle=flag)": "numpy-pickle",
    "import numpy as np\nnp.load(path, None, True)": "numpy-pickle",
    "import yaml\nyaml.load_all(text)": "yaml-load",
    "import yaml\nyaml.load_all(text, Loader=yaml.FullLoader)": "yaml-load",
    "import yaml\nyaml.unsafe_load(text)": "yaml-load",
    "import yaml\nyaml.full_load(text)": "yaml-load",
    "compile(config_text, 'config', 'exec')": "compile",
    "import builtins\nbuiltins.compile(config_text, 'config', 'exec')": "compile",
    "__import__(config['module'])": "import",
    "import subprocess as sp\nsp.Popen(command, shell=use_shell)": "shell",
    "import torch, os\ntorch.serialization.add_safe_globals([os.system])": "safe-globals",
    "import argparse, collections, torch\nwith torch.serialization.safe_globals(\n"
    "        [argparse.Namespace, collections.Counter]):\n    pass": "safe-globals",
    "import torch\ntorch.serialization.add_safe_globals(ALLOWED)": "safe-globals",
    "import webdataset as wds\nwds.WebDataset(urls).shuffle(9).decode('pil')": "wds-decode",
    "import webdataset as wds\nds = wds.WebDataset(urls)\nds = ds.shuffle(9)\nds.decode()": "wds-decode",
    "import webdataset\nwebdataset.DataPipeline(webdataset.SimpleShardList(u), webdataset.decode('torch'))":
        "wds-decode",
    "import webdataset as wds\nwds.tarfile_to_samples()(urls).decode()": "wds-decode",
    "import webdataset as wds\nwds.autodecode.basichandlers('x.pyd', blob)": "wds-decode",
    "from webdataset.autodecode import torch_loads\ntorch_loads(blob)": "wds-decode",
}

SAFE = [
    "import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
    "import argparse, torch\nwith torch.serialization.safe_globals([argparse.Namespace]):\n"
    "    torch.load(path, weights_only=True)",
    "import torch\ntorch.serialization.add_safe_globals([argparse.Namespace])\nimport argparse",
    "trainer.fit(module, data, ckpt_path=path, weights_only=True)\ntrainer.fit(module, data, ckpt_path=None)",
    "from safetensors.torch import load_file\nload_file(path)",
    "import json\njson.loads(text)\n__import__('json')",
    "import _pickle, pickle\nblob = _pickle.dumps(obj)\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
    "import numpy as np\nnp.load(path)\nnp.load(path, allow_pickle=False)\nnp.save(p, x, allow_pickle=False)",
    "import yaml\nyaml.safe_load_all(text)\nyaml.load_all(text, Loader=yaml.SafeLoader)\nyaml.safe_dump(data)",
    "torch.compile(model)\nre.compile('x')\nfrom re import compile\ncompile('x')",
    "import subprocess, sys\nsubprocess.run([sys.executable, '-c', code], check=True, shell=False)\n"
    "subprocess.run(command, shell=None)",
    "import webdataset as wds\nds = wds.WebDataset(urls, select_files=keep).shuffle(9)\n"
    "for s in ds:\n    label = int(s['cls'].decode())",
    "import tarfile\nwith tarfile.open(p) as tar:\n    tar.extractfile(m).read().decode()",
    "images = tokenizer.decode(codes)\nout = vq.model.decode(z).sample",
]


@pytest.mark.parametrize("source", list(UNSAFE), ids=range(len(UNSAFE)))
def test_scanner_flags_each_unsafe_pattern(source: str) -> None:
    found = scan_source(source)
    assert [f.rule for f in found] == [UNSAFE[source]], found


@pytest.mark.parametrize("source", SAFE, ids=range(len(SAFE)))
def test_scanner_passes_safe_equivalents(source: str) -> None:
    assert scan_source(source) == []


# --- ruff's rules find each pattern they cover and pass its safe equivalent ------------------------------

RUFF_UNSAFE = {
    "import pickle\npickle.loads(blob)": "S301",
    "import pickle\nwith open(p, 'rb') as f:\n    pickle.load(f)": "S301",
    "from pickle import Unpickler\nUnpickler(stream).load()": "S301",
    "import dill\ndill.loads(blob)": "S301",
    "import pandas as pd\npd.read_pickle(path)": "S301",
    "import shelve\nshelve.open(path)": "S301",
    "import jsonpickle\njsonpickle.decode(text)": "S301",
    "import marshal\nmarshal.loads(blob)": "S302",
    "import yaml\nyaml.load(text)": "S506",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)": "S506",
    "import yaml\nyaml.load(text, yaml.UnsafeLoader)": "S506",
    "from yaml import FullLoader, load\nload(text, Loader=FullLoader)": "S506",
    "eval(config_text)": "S307",
    "import builtins\nbuiltins.eval(config_text)": "S307",
    "exec(config_text, {})": "S102",
    "from builtins import exec as run\nrun(config_text)": "S102",
    "import subprocess\nsubprocess.run(command, shell=True)": "S602",
    "from subprocess import Popen\nPopen(command, shell=1)": "S602",
    "launch(command, shell=True)": "S604",
    "import os\nos.system(command)": "S605",
    "import os\nos.popen(command)": "S605",
    "import subprocess\nsubprocess.getoutput(command)": "S605",
}

RUFF_SAFE = [
    "import pickle\nblob = pickle.dumps(obj)\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
    "import os\nclass Boom:\n    def __reduce__(self):\n        return (os.system, ('true',))",
    "import json, marshal\njson.loads(text)\nblob = marshal.dumps(obj)",
    "import yaml\nyaml.safe_load(text)\nyaml.load(text, Loader=yaml.SafeLoader)\nyaml.load(text, yaml.CSafeLoader)",
    "import ast\nast.literal_eval(text)\nmodel.eval()\nself.model.eval()\nengine.exec(query)",
    "def check(eval):\n    return eval(text)",
    "import subprocess, sys\nsubprocess.run([sys.executable, '-c', code], check=True, shell=False)",
]


def _ruff(*args: str, cwd: Path) -> list[dict]:
    """ruff's findings, as JSON, for `ruff check --select RUFF_RULES ARGS` run in `cwd`."""
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it is a dev dependency: pip install -e '.[dev]')")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--select",
                           ",".join(RUFF_RULES), "--output-format", "json", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr  # 1: findings; anything else: ruff itself failed
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def ruff_on_snippets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """One ruff run over a folder of every snippet (the scanner's too): snippet -> the codes reported in it."""
    folder = tmp_path_factory.mktemp("ruff_snippets")
    snippets = [*RUFF_UNSAFE, *RUFF_SAFE, *UNSAFE]
    for i, source in enumerate(snippets):
        (folder / f"snippet_{i:02d}.py").write_text(source + "\n", encoding="utf-8")
    codes: dict[str, list[str]] = {source: [] for source in snippets}
    for finding in _ruff(".", cwd=folder):
        codes[snippets[int(Path(finding["filename"]).stem.split("_")[1])]].append(finding["code"])
    return codes


@pytest.mark.parametrize("source", list(RUFF_UNSAFE), ids=range(len(RUFF_UNSAFE)))
def test_ruff_reports_each_unsafe_pattern(source: str, ruff_on_snippets: dict[str, list[str]]) -> None:
    assert ruff_on_snippets[source] == [RUFF_UNSAFE[source]]


@pytest.mark.parametrize("source", RUFF_SAFE, ids=range(len(RUFF_SAFE)))
def test_ruff_passes_safe_equivalents(source: str, ruff_on_snippets: dict[str, list[str]]) -> None:
    assert ruff_on_snippets[source] == []


def test_each_case_has_one_checker(ruff_on_snippets: dict[str, list[str]]) -> None:
    # The scanner reports none of ruff's cases, and ruff none of the scanner's: a case that ruff starts
    # to cover (a newer ruff) fails here, to be moved from the scanner to RUFF_UNSAFE.
    assert {source: found for source in RUFF_UNSAFE if (found := scan_source(source))} == {}
    assert {source: codes for source in UNSAFE if (codes := ruff_on_snippets[source])} == {}


# --- the repository ----------------------------------------------------------------------------------------

def test_no_unsafe_calls_in_the_repository() -> None:
    files = source_files()
    scanned = {f.relative_to(REPO).as_posix() for f in files}
    # The walk must reach the packages and the tests (and nothing in .venv), or it proves nothing.
    assert {"tokenizers_vq/checkpoint.py", "engram_vision/checkpoint.py", "train/data/tokens.py",
            "tests/reliability/test_security_scan.py"} <= scanned and not any(".venv" in p for p in scanned)
    found = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        found += [f for f in scan_source(path.read_text(encoding="utf-8"), rel)
                  if (f.path, f.rule, f.code) not in ALLOWED]
    assert not found, "unsafe calls (safe forms: tests/reliability/test_security_scan.py SAFE):\n" + "\n".join(map(str, found))


def test_ruff_rules_hold_in_the_repository() -> None:
    # Run with ruff's rules selected here, not from pyproject.toml, and with noqa comments ignored, so
    # that every exception is one reviewed in RUFF_ALLOWED (and its line carries the matching noqa).
    found, reviewed = [], set()
    for finding in _ruff("--ignore-noqa", "--extend-exclude", ".venv", ".", cwd=REPO):
        path = Path(finding["filename"]).resolve()
        rel = path.relative_to(REPO).as_posix()
        line = path.read_text(encoding="utf-8").splitlines()[finding["location"]["row"] - 1]
        code, _, comment = line.partition("  # noqa: ")
        key = (rel, finding["code"], code.strip())
        if key in RUFF_ALLOWED and comment.startswith(finding["code"]) and comment[len(finding["code"]):].strip():
            reviewed.add(key)
        else:
            found.append(f"{rel}:{finding['location']['row']}: {finding['code']} {finding['message']}")
    assert not found, "unsafe calls (safe forms: tests/reliability/test_security_scan.py RUFF_SAFE):\n" \
        + "\n".join(found)
    # Each reviewed exception is still there and was seen, so the run reached the tests as well.
    assert reviewed == set(RUFF_ALLOWED)
