"""Every `.venv/bin/python …` command in the README and in `docs/*.md`, as written: its flags parse and its config
(preset, overrides, --data) validates through the script's own parser and config path; `--help` / `--list-keys` ones
run in full.

What this cannot check without the datasets (training on them) the closing notes of the real-image runs record:
those ran through the same scripts with `--data` at a real VOC tree.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from comic import cli
from comic.data import __main__ as data_main
from comic.studies import cli as study_cli

REPO = Path(__file__).resolve().parents[1]
PYTHON = ".venv/bin/python "
MODEL_SCRIPTS = ("experiments/evaluate.py", "experiments/predict.py")


PAGES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))


def readme_commands() -> list[str]:
    """The python commands of every page: inside ```bash fences, `\\` continuations joined, comments cut."""
    text = "\n".join(page.read_text() for page in PAGES)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(PYTHON):
                commands.append(line[len(PYTHON):])
    return commands


COMMANDS = readme_commands()


def _argv(command: str, home: Path) -> list[str]:
    return [word.replace("~/", f"{home}/") for word in shlex.split(command)]


def _module(script: str):
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_has_its_commands():
    scripts = {shlex.split(c)[0] for c in COMMANDS}
    assert {"experiments/train.py", "experiments/sweep.py", "experiments/tuned.py", "-m"} <= scripts, scripts
    assert any(c.startswith("ablations/") for c in COMMANDS)


def test_every_docs_page_is_linked_from_the_readme_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_parses_and_validates(command, tmp_path, capsys):
    argv = _argv(command, tmp_path)
    for folder in ("data/VOCdevkit", "data/coco", "data/mydata"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    if argv[:3] == ["-m", "comic.data", "build"]:
        _check_builder(argv[2:], capsys)
    elif "--help" in argv or "--list-keys" in argv:
        _run_in_full(argv, capsys)
    elif argv[0].startswith("ablations/") or argv[0] == "experiments/baselines.py":
        _check_study(argv, capsys)
    elif argv[0] in MODEL_SCRIPTS:
        _module(argv[0]).parse_args(argv[1:])  # a model URI resolves only against a tracking store that holds it
    else:
        module = _module(argv[0])
        args = module.parse_args(argv[1:])
        if hasattr(module, "build_spec") and not args.resume:
            module.build_spec(args)  # the sweep: config, space, resources
        elif hasattr(module, "make_study"):
            assert module.make_study(args).budget.trials >= 1  # the tuned study: config, arms, budget
        else:
            cli.base_config(args)


def _check_builder(argv: list[str], capsys) -> None:
    if "--help" in argv:
        with pytest.raises(SystemExit) as stop:
            data_main.main(argv)
        assert stop.value.code == 0 and "synthetic" in capsys.readouterr().out
        return
    data_main.data_config(data_main.make_parser().parse_args(argv))


def _run_in_full(argv: list[str], capsys) -> None:
    module = _module(argv[0])
    try:
        code = module.main(argv[1:])
    except SystemExit as stop:  # --help
        code = stop.code
    out = capsys.readouterr().out
    assert code == 0 and out.strip(), out


def _check_study(argv: list[str], capsys) -> None:
    module = _module(argv[0])
    parser = study_cli.build_parser(module.SPEC, module.__doc__)
    args = cli.parse(parser, argv[1:])
    cli.base_config(args)
    study = study_cli.make_study(module.SPEC, args)
    assert study.seeds == tuple(args.seeds or (0, 1, 2))
