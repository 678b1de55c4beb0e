"""Every ``medsft …`` command shown in README.md and docs/*.md parses, and the docs' links and file names hold.

The commands are read from the ```` ```bash ```` blocks (lines ending in ``\\`` joined, ``#`` comments dropped) and
run as if typed in the repository root, without training, downloading or loading a model:

- ``fit`` / ``validate`` / ``test`` / ``predict``: the real console entry (``cli_main``) with ``--print_config``
  appended, which parses and type-checks every option and exits before anything is built; then medsft's own
  config checks (``check_config``) on the printed config. Paths given as plain strings (``--data.dataset``,
  ``--data.predict_dataset questions.jsonl``, ``--model.model_name_or_path runs/…/hf_model``) are not opened at
  parse time, and ``--print_config`` exits before ``MedSFTCLI._parse_ckpt_path`` would read a ``--ckpt_path``
  (which it does only for an existing file anyway): these files are the reader's own or a run's output, so
  instead every ``runs/<name>/version_<n>/…`` path is checked against the config it is used with (its CSV
  logger's run name, its ModelCheckpoint file names, ``hf_model``).
- ``preview``: its own parser (``preview.build_parser``) on the argv ``preview.main`` would give it.
- ``export`` / ``tiny``: their ``main`` for real, with the function that would do the work replaced by a recorder.
- ``memory``: run for real (arithmetic only); the printed example in docs/training.md must equal its output.

Lines that only wrap medsft (``torchrun … "$(which medsft)" fit …``, ``srun … medsft fit …``) are checked from
their ``medsft`` part on; the launcher's own flags are not (that would need a launcher, and a cluster).
All documented commands run in one subprocess, one argv after another (~0.2 s each after a ~3 s import).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from medsft_lightning.cli import EXTRA_COMMANDS, check_config
from tests.conftest import offline_env

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LIGHTNING_COMMANDS = {"fit", "validate", "test", "predict"}
KNOWN_COMMANDS = LIGHTNING_COMMANDS | set(EXTRA_COMMANDS)
SHELL_LANGUAGES = {"bash", "sh", "shell"}
RUN_PATH = re.compile(r"^runs/(?P<name>[^/]+)/version_\d+(?:/(?P<rest>.+))?$")


@dataclass(frozen=True)
class Command:
    where: str  # file:line of the command's first line
    argv: tuple[str, ...]  # after ``medsft``
    wrapper: str | None = None  # torchrun, srun, … when medsft is not the first word

    @property
    def sub(self) -> str:
        return self.argv[0] if self.argv else ""


def fenced_blocks(text: str):
    """``(language, first line number, lines)`` of every fenced code block of a markdown text."""
    lines, i = text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^\s*(`{3,})\s*([\w+-]*)", lines[i])
        if not match:
            i += 1
            continue
        fence, language, start = match.group(1), match.group(2).lower(), i + 2
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        yield language, start, body


def extract_commands(text: str, name: str) -> list[Command]:
    """The ``medsft`` invocations of the shell blocks of a markdown text (see the module docstring)."""
    commands = []
    for language, start, body in fenced_blocks(text):
        if language not in SHELL_LANGUAGES:
            for offset, line in enumerate(body):  # a command hidden from this check, e.g. in a plain block
                words = line.split()
                assert not (len(words) > 1 and words[0] == "medsft" and words[1] in KNOWN_COMMANDS), (
                    f"{name}:{start + offset}: a medsft command outside a ```bash block: {line.strip()!r}")
            continue
        joined, first = "", None
        for offset, line in enumerate(body):
            first = start + offset if first is None else first
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            words = shlex.split(joined + line, comments=True)
            joined, where, first = "", f"{name}:{first}", None
            at = next((k for k, w in enumerate(words) if w == "medsft" or w.endswith("which medsft)")), None)
            if at is not None:  # anything else (pip, export, python -m pytest, ruff) is not medsft's to check
                commands.append(Command(where, tuple(words[at + 1:]), words[0] if at else None))
    return commands


def documented_commands() -> list[Command]:
    found = []
    for path in DOCS:
        found += extract_commands(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    return found


def _absolute_configs(argv: tuple[str, ...]) -> list[str]:
    """The argv as run from the repository root: ``configs/…`` files made absolute (the subprocess runs elsewhere)."""
    return [str(REPO / a) if a.startswith("configs/") and (REPO / a).is_file() else a for a in argv]


def job(cmd: Command) -> dict:
    argv = _absolute_configs(cmd.argv)
    if cmd.sub in LIGHTNING_COMMANDS and not {"--help", "-h", "--print_config"} & set(argv):
        argv.append("--print_config")
    return {"where": cmd.where, "argv": argv}


# Runs in one subprocess: each job's argv through the entry point its command uses; a JSON list of results.
DRIVER = r'''
import contextlib, importlib, io, json, socket, sys

real_connect = socket.socket.connect
def guarded(self, address):  # nothing here may reach the network
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in {"localhost", "::1"} or "/" in host):
        raise RuntimeError(f"tried to reach the network: {address}")
    return real_connect(self, address)
socket.socket.connect = guarded

from medsft_lightning.training import export

from medsft_lightning.tools import preview

from medsft_lightning.hub import tiny
from medsft_lightning.cli import EXTRA_COMMANDS, cli_main
PARSE_ONLY = {"chat", "webchat", "compare", "eval", "serve", "doctor"}

calls = []
export.export_checkpoint = lambda ckpt, out_dir: calls.append({"ckpt": ckpt, "out_dir": out_dir})
tiny.write_tiny_qwen3 = lambda out_dir, seed=0: calls.append({"out_dir": out_dir, "seed": seed})

def run(argv):
    sub = argv[0] if argv else ""
    if sub == "preview":  # what preview.main parses, without building the DataModule
        preview.build_parser().parse_args(preview._config_sections(argv[1:]))
    elif sub in PARSE_ONLY:  # what their main parses, without loading a model or starting a server
        args = argv[1:argv.index("--")] if "--" in argv else argv[1:]  # serve: what follows -- is vLLM's
        importlib.import_module(EXTRA_COMMANDS[sub]).build_parser().parse_args(args)
    elif sub in {"fit", "validate", "test", "predict"} or sub in EXTRA_COMMANDS:
        cli_main(argv)
    else:
        raise SystemExit(f"not a medsft command: {sub!r}")

results = []
for job in json.load(open(sys.argv[1])):
    out, err, code, calls[:] = io.StringIO(), io.StringIO(), 0, []
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(job["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except Exception as exc:
            code = 1
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    results.append({**job, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "calls": list(calls)})
json.dump(results, open(sys.argv[2], "w"))
'''


def _csv_runs(cfg: dict) -> dict[str, set[str]]:
    """``{run name: checkpoint file stems}`` of a config (raw YAML or printed): what ``runs/<name>/…`` may hold."""
    trainer = cfg.get("trainer") or {}
    loggers, callbacks = trainer.get("logger") or [], trainer.get("callbacks") or []
    loggers = [loggers] if isinstance(loggers, dict) else loggers
    stems = {"last"} | {(cb.get("init_args") or {}).get("filename") for cb in callbacks
                        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ModelCheckpoint")}
    return {(lg.get("init_args") or {}).get("name"): stems - {None} for lg in loggers
            if isinstance(lg, dict) and str(lg.get("class_path", "")).endswith("CSVLogger")
            and (lg.get("init_args") or {}).get("save_dir") == "runs"}


ALL_RUNS: dict[str, set[str]] = {}
for _path in sorted((REPO / "configs").glob("*.yaml")):
    ALL_RUNS.update(_csv_runs(yaml.safe_load(_path.read_text(encoding="utf-8"))))


def run_path_problems(where: str, argv: list[str], runs: dict[str, set[str]]) -> list[str]:
    """A ``runs/<name>/version_<n>/…`` argument must be where the config in use writes: its run name, then
    ``hf_model`` or ``checkpoints/<ModelCheckpoint filename or last>.ckpt``."""
    out = []
    for arg in argv:
        match = RUN_PATH.match(arg)
        if not match:
            continue
        name, rest = match.group("name"), match.group("rest")
        if name not in runs:
            out.append(f"{where}: {arg}: no config used here writes runs/{name} (it writes {sorted(runs)})")
        elif rest is not None and rest != "hf_model" and not (re.fullmatch(r"checkpoints/[^/]+\.ckpt", rest)
                                         and Path(rest).stem in runs[name]):
            out.append(f"{where}: {arg}: a run of this config holds hf_model or checkpoints/"
                       f"{{{','.join(sorted(runs[name]))}}}.ckpt, not {rest}")
    return out


def problems(result: dict) -> list[str]:
    """What is wrong with one command's run: a parse error, a config check, a run path, a missing output."""
    where, argv = result["where"], result["argv"]
    sub = argv[0] if argv else ""
    if result["code"] != 0:
        said = (result["stderr"] + result["stdout"]).strip().splitlines()
        return [f"{where}: medsft {shlex.join(argv)}: exit {result['code']}:\n    " + "\n    ".join(said[-6:])]
    if "--help" in argv or "-h" in argv:
        return [] if "usage:" in result["stdout"] else [f"{where}: no usage printed for --help"]
    if sub in LIGHTNING_COMMANDS:
        cfg = yaml.safe_load(result["stdout"])
        return ([f"{where}: {p}" for p in check_config(cfg)]
                + run_path_problems(where, argv, _csv_runs(cfg)))
    if sub in ("export", "tiny"):
        done = [] if len(result["calls"]) == 1 else [f"{where}: medsft {sub} did not reach its work: {result}"]
        return done + run_path_problems(where, argv, ALL_RUNS)
    if sub == "memory":
        return [] if result["stdout"].startswith("medsft memory: estimate") else [f"{where}: no estimate printed"]
    if sub in ("chat", "webchat", "compare", "eval", "serve", "doctor"):  # parsed only; runs/… paths: a config's run
        return run_path_problems(where, argv, ALL_RUNS)
    return [] if sub == "preview" else [f"{where}: {sub!r} is not a medsft command"]


COMMANDS = documented_commands()

# One flag (or value, or path) broken in a scratch copy of a doc, and what the failure must name.
FIT = ("docs/training.md", "full.yaml --data.batch_size 2")
BREAKAGES = {
    "fit-flag": (*FIT, "full.yaml --data.batchsize 2", "--data.batchsize"),
    "fit-type": (*FIT, "full.yaml --data.batch_size two", "data.batch_size"),
    "fit-config-check": (*FIT, "full.yaml --data.batch_size 0", "--data.batch_size=0"),
    "fit-config-file": ("README.md", "configs/demo.yaml    #", "configs/demo.yml    #", "demo.yml"),
    "validate-flag": ("docs/training.md", "--ckpt_path runs/", "--ckpt_pth runs/", "--ckpt_pth"),
    "validate-run-name": ("docs/training.md", "runs/qwen3-1.7b-medical/version_0/checkpoints/best.ckpt",
                          "runs/qwen3-1.7b-medicall/version_0/checkpoints/best.ckpt", "qwen3-1.7b-medicall"),
    "predict-flag-continued": ("docs/generation.md", "--predict_writer.output_path answers.jsonl",
                               "--predict_writer.outputpath answers.jsonl", "--predict_writer.outputpath"),
    "predict-nested-flag": ("docs/generation.md", "--model.generation.do_sample false --",
                            "--model.generation.dosample false --", "--model.generation.dosample"),
    "torchrun-wrapped-flag": ("docs/scaling.md", "--trainer.num_nodes 2", "--trainer.numnodes 2",
                              "--trainer.numnodes"),
    "memory-flag": ("docs/training.md", "--data.batch_size 8", "--data.batchsize 8", "--data.batchsize"),
    "preview-flag": ("docs/data.md", "--data.max_length 1024", "--data.maxlength 1024", "--data.maxlength"),
    "tiny-flag": ("docs/training.md", "medsft tiny tiny-qwen3", "medsft tiny tiny-qwen3 --seeds 1", "--seeds"),
    "export-argument": ("docs/generation.md", "qwen3-1.7b-medical-hf", "qwen3-1.7b-medical-hf extra", "extra"),
}


def scratch_commands(folder: Path) -> dict[str, Command]:
    """For each breakage: a scratch copy of its doc with that one change, and the one command it changed."""
    out = {}
    for key, (doc, old, new, _) in BREAKAGES.items():
        text = (REPO / doc).read_text(encoding="utf-8")
        assert old in text, f"{doc} no longer shows {old!r}: update BREAKAGES"
        copy = folder / key / doc
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text.replace(old, new, 1), encoding="utf-8")
        before = {(c.where, c.argv) for c in extract_commands(text, doc)}
        after = extract_commands(copy.read_text(encoding="utf-8"), doc)
        changed = [c for c in after if (c.where, c.argv) not in before]
        assert len(changed) == 1, f"{key}: expected one changed command in {doc}, got {changed}"
        out[key] = changed[0]
    return out


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict:
    """Every documented command and every scratch breakage, run in one offline subprocess."""
    work = tmp_path_factory.mktemp("docs-commands")
    broken = scratch_commands(work / "scratch")
    jobs = [job(c) for c in COMMANDS] + [job(c) for c in broken.values()]
    (work / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    empty = {name: work / name for name in ("cwd", "medsft-cache", "modelscope-cache")}
    for folder in empty.values():
        folder.mkdir()
    env = offline_env(empty["medsft-cache"], MODELSCOPE_CACHE=str(empty["modelscope-cache"]))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(work / "jobs.json"), str(work / "results.json")],
                          cwd=empty["cwd"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((work / "results.json").read_text(encoding="utf-8"))
    return {"documented": dict(zip(COMMANDS, results)), "broken": dict(zip(broken, results[len(COMMANDS):])),
            "empty": empty}


def test_the_docs_show_every_command():
    shown = {c.sub for c in COMMANDS}
    assert {"fit", "validate", "predict", "export", "memory", "preview", "tiny"} <= shown, shown
    readme = {c.argv for c in COMMANDS if c.where.startswith("README.md")}
    assert ("fit", "--config", "configs/demo.yaml") in readme and ("fit", "--config", "configs/full.yaml") in readme
    wrapped = {c.wrapper for c in COMMANDS if c.wrapper}
    assert wrapped == {"torchrun", "srun"}, wrapped  # a new launcher: check that its medsft part is found


@pytest.mark.e2e  # a console-script subprocess
@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_parses(cmd, checked):
    assert problems(checked["documented"][cmd]) == []


@pytest.mark.e2e  # a console-script subprocess
def test_parsing_built_downloaded_and_wrote_nothing(checked):
    for name, folder in checked["empty"].items():
        assert not any(folder.iterdir()), f"{name}: {sorted(p.name for p in folder.iterdir())}"


@pytest.mark.e2e  # a console-script subprocess
@pytest.mark.parametrize("key", sorted(BREAKAGES))
def test_a_broken_flag_in_a_doc_fails(key, checked):
    found = problems(checked["broken"][key])
    assert found, f"{key}: {checked['broken'][key]['argv']} passed the check"
    assert BREAKAGES[key][3] in "\n".join(found), found


@pytest.mark.e2e  # a console-script subprocess
def test_memory_example_is_what_memory_prints(checked):
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    shown = [body for language, _, body in fenced_blocks(text)
             if language not in SHELL_LANGUAGES and body and body[0].startswith("medsft memory: estimate")]
    assert len(shown) == 1
    result = next(r for c, r in checked["documented"].items()
                  if c.where.startswith("docs/training.md") and c.argv == ("memory", "--config", "configs/full.yaml"))
    assert shown[0] == result["stdout"].rstrip("\n").splitlines()


def _prose(text: str) -> str:
    """A markdown text without its fenced blocks."""
    return re.sub(r"^\s*```.*?^\s*```[^\n]*$", "", text, flags=re.S | re.M)


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but ``-``/``_`` dropped, spaces as ``-``."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#{1,6}\s+(.+)$", _prose(text), flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_links_and_named_files_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    prose = _prose(text)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file.read_text(encoding="utf-8")), f"{doc.name}: link to {target}: no heading"
    for named in re.findall(r"`((?:configs|tests|benchmarks|medsft_lightning|docs)/[\w./-]+)`", prose):
        assert (REPO / named).exists(), f"{doc.name}: `{named}` does not exist"
    for module, name in re.findall(r"`medsft_lightning\.([\w.]+)\.(\w+)`", prose):
        base = REPO / "medsft_lightning" / module.replace(".", "/")
        source = (base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py")
        assert re.search(rf"^(class|def) {name}\b", source.read_text(encoding="utf-8"), flags=re.M), \
            f"{doc.name}: {module}.{name}"


def test_readme_links_every_docs_page():
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", (REPO / "README.md").read_text(encoding="utf-8")))
    assert linked == {p.name for p in (REPO / "docs").glob("*.md")}


def test_design_names_only_modules_that_exist():
    text = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    picture = next(body for language, _, body in fenced_blocks(text) if not language)
    named = set(re.findall(r"(?<![\w/])([\w/]+\.py)\b", "\n".join(picture)))
    assert len(named) > 20
    missing = sorted(n for n in named if not (REPO / "medsft_lightning" / n).is_file())
    assert not missing, missing
