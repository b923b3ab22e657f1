"""Every command in the code blocks of README.md and docs/*.md that runs on the embedded default,
run as written, the README's first and then the pages' in name order, on a tiny copy of the
project after its `dvc repro` (what `make repro` ends with). The rest are listed in EXCLUDED with
the reason; a command in neither list fails the test, and so does an EXCLUDED entry no page has
any more. Every link between the pages leads to a file and heading that exist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _project import ROOT, git_env, make_project, ran, run

EXCLUDED = {
    "make repro": "sets up .venv and runs the full-size default (10 min); the test starts from "
    "the tiny project's `dvc repro`, the command `make repro` ends with",
    "make test": "is this test suite",
    "python recipes/run.py diff-gta2cs": "needs SD-2.1 and GTA5/Cityscapes/ACDC/Dark Zurich in "
    "data/external and a GPU; tests/test_recipes.py runs the runner and its checks",
    "python recipes/run.py ptdiffseg-cs2dz": "needs SD-2.1 and Cityscapes/Dark Zurich",
    "python recipes/run.py diff-gta2cs --queue": "needs the recipe's data",
    "python recipes/run.py diff-gta2cs --dry-run": "exits 1 naming the missing data/external "
    "roots (tests/test_recipes.py::test_missing_data_and_model_are_one_clear_error)",
    "dvc exp run --queue -S model.device=cuda:free -S train.device=cuda:free -S "
    "evaluate.device=cuda:free -S train.fusion=diff": "needs GPUs (on a CPU machine it stops "
    "with one line: tests/test_faults.py)",
    "dvc queue start -j 4 && dvc queue status": "4 workers for 4 GPUs",
    "python -m pipeline.plan --params recipes/diff-gta2cs.yaml --images gta5=24966 "
    "cityscapes=500 acdc=406 darkzurich=50": "prints the budget, then exits 1 where 2.2 TB are "
    "not free, as it should (tests/test_plan.py runs the same budget)",
}
AT_ROOT = {"python docs/tables.py --check"}  # reads the repository's own results


def pages() -> list[Path]:
    """The README, then docs/ by name (docs/tables.py builds the same pages' tables)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands() -> list[tuple[str, str]]:
    """(language, command) of every code block line of the pages: bash lines with their
    comments cut and continuations joined; a python block as one command."""
    text = "\n".join(page.read_text() for page in pages())
    out = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", text, re.S):
        if lang == "python":
            out.append((lang, body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            command = re.split(r"\s+#\s", line)[0].strip()
            if command:
                out.append((lang, re.sub(r"\s+", " ", command)))
    return out


def _queue(project: Path) -> dict[str, int]:
    status = run(["dvc", "queue", "status"], project)
    states = re.findall(r"^\w{7}\s+\S+\s+\S+ \S+\s+(\w+)\s*$", status, re.M)
    return {s: states.count(s) for s in set(states)}


def _wait_for_queue(project: Path, timeout_s: float = 900) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = _queue(project)
        if not states.get("Queued") and not states.get("Running"):
            return states
        time.sleep(3)
    raise AssertionError(f"the queue did not finish in {timeout_s} s: {states}")


def test_every_readme_command_is_run_or_excluded_with_a_reason() -> None:
    commands = {c for _, c in readme_commands()}
    assert not set(EXCLUDED) - commands, "EXCLUDED lists commands no page has any more"
    assert len(commands) >= 20


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_link_between_the_pages_leads_somewhere() -> None:
    checked = 0
    for page in [*pages(), ROOT / "benchmarks" / "README.md"]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.relative_to(ROOT)}: link to {target}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                assert anchor in {_anchor(h) for h in headings}, (
                    f"{page.relative_to(ROOT)}: link to {target}: {file.name} has no such heading"
                )
            checked += 1
    assert checked >= 10


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", {"timesteps": [50, 150]})
    run(["dvc", "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "reproduced"], project)
    done = []
    for lang, command in readme_commands():
        if command in EXCLUDED:
            continue
        args = [sys.executable, "-c", command] if lang == "python" else ["bash", "-c", command]
        before = _queue(project) if "--queue" in command else {}
        cwd = ROOT if command in AT_ROOT else project
        proc = subprocess.run(args, cwd=cwd, env=git_env(), capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README command failed: {command}\n{output[-4000:]}"
        done.append(command)
        # What the README says each does.
        if command.startswith("dvc exp run -S 'timesteps=[50,150,250]'"):
            assert {s for s in ran(output) if s.startswith("extract@")} == {"extract@250"}
        if command == "dvc metrics diff":
            assert "game" in output and len(output.strip().splitlines()) <= 30, output
        if "--queue" in command and "timesteps=[50],[150]" in command:
            assert _queue(project).get("Queued", 0) == before.get("Queued", 0) + 2
        if command.startswith("dvc queue start"):
            states = _wait_for_queue(project)
            assert not states.get("Failed"), run(["dvc", "queue", "status"], project)
        if command.startswith("dvc exp show"):
            assert "val.mIoU" in output or "mIoU" in output, output[-2000:]
        if command == "dvc plots show":
            assert (project / "dvc_plots" / "index.html").is_file()
        if command == "dvc push":
            assert any((tmp_path / "dvc-remote").rglob("*"))
    print(f"ran {len(done)} README commands: {json.dumps(done, indent=1)}")
    assert len(done) >= 15
