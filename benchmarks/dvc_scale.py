"""DVC's bookkeeping per command and per experiment start at DIFF's recipe's file count at GTA scale.

DVC pays per file of an output before it reads a byte (stat, state lookups, links, one object
per file in the cache and the remote), and each queued or `--temp` experiment starts with a
checkout of every output into a fresh workspace. This builds, per store layout, a real git + DVC
project whose `extract@t` stages write exactly the files the plan lists for DIFF's recipe at GTA
scale (`python -m pipeline.plan`'s `Budget.store_files`: every store of every timestep and set),
each file a few unique bytes, so that only the per-file cost is measured; `train` and `evaluate`
read the stores' folder as the real stages do and take no time of their own. It then times,
layouts interleaved, each command a user types (medians and min-max over rounds):

- `dvc status`, a no-op `dvc repro`;
- `dvc exp run -S train.lr=...` (a param that touches no store): the whole command less the
  stages' own seconds;
- a `--temp` experiment and a queued one (`dvc exp run --queue`, `dvc queue start`): seconds from
  the command to its first stage (the executor's full checkout), and the whole run less the
  stages;
- `dvc push` of everything to a fresh local remote, `dvc pull` of one timestep's stores into a
  fresh clone, `dvc gc -w -f`.

A layout is `name=<commit>` (the plan of that commit's code, from a `git worktree` under
`.bench/`) or `name=.` (the work tree), with `@<MB>` its extract.shard_mb where the code has
one. Layouts of more than LARGE files are measured once per command (minutes each), the others
`--rounds` times, after the smaller layouts' rounds (interleaved among themselves), each command
stopped after `--large-timeout` seconds (recorded as stopped: a lower bound). A project built
by an earlier run for the same file list is reused with `--reuse` (its first repro's seconds
then come from its files' times: the layout list written to dvc.lock written). Over the work
tree's layouts, a line per command (seconds = a + b x files,
least squares): what `python -m pipeline.plan` prints as each command's DVC overhead. The checks: every project holds exactly its layout's
files, each exp run gives its lr's metric, a pull brings every file of its timestep; a failed
check exits 1 and writes nothing.

    python benchmarks/dvc_scale.py --layouts before=38131a4 after=. after-512=.@512 \
        --rounds 2 --reuse                               # ~3 h, 30 GB, idle machine
    python benchmarks/dvc_scale.py --layouts after=. after-512=.@512 after-2048=.@2048 \
        --count-only before=38131a4 --rounds 2           # ~40 min: the work tree's layouts
    python benchmarks/dvc_scale.py --layouts after=. --images gta5=400 --rounds 1 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.reporting.machine import ROOT, Run

RESULTS = Path(__file__).resolve().parent / "results" / "dvc_scale.json"
RECIPE = "recipes/diff-gta2cs.yaml"
GTA = ["gta5=24966", "cityscapes=500", "acdc=406", "darkzurich=50"]
COMMANDS = ("status", "repro_noop", "exp_run", "exp_temp", "exp_queue", "push", "pull_one_t", "gc")
LARGE = 100_000  # files: a layout this large is measured once per command

# What each stage of the scratch project runs: extract writes its timestep's files (a few unique
# bytes each: DVC's cache would merge identical ones), train and evaluate note when they start
# and end in a log outside the project (queued experiments run in copies of it).
STAGE = r"""
import json, os, sys, time
from pathlib import Path
what, log = sys.argv[1], sys.argv[-1]
def note(event):
    with open(log, "a") as f:
        f.write(json.dumps({"stage": what, "event": event, "t": time.time(), "cwd": os.getcwd()}) + "\n")
if what == "digest":  # what extract@t writes beside its stores, when train depends on it
    Path("data/features/digests").mkdir(parents=True, exist_ok=True)
    Path(f"data/features/digests/t{sys.argv[2]}.json").write_text(sys.argv[2] + "\n")
elif what == "write":
    prefix, layout = sys.argv[2], sys.argv[3]
    files = json.loads(Path(layout).read_text())
    for rel, names in files.items():
        if not rel.startswith(prefix):
            continue
        for name in names:
            p = Path("data", rel, name)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"{rel}/{name}\n")
else:
    note("start")
    import yaml
    lr = yaml.safe_load(Path("params.yaml").read_text())["train"]["lr"]
    if what == "train":
        Path("data/heads").mkdir(parents=True, exist_ok=True)
        Path("data/heads/head.txt").write_text(f"{lr}\n")
    else:
        Path("metrics.json").write_text(json.dumps({"lr": float(Path("data/heads/head.txt").read_text())}))
    note("end")
"""


class Stopped(Exception):
    """A command stopped at its time limit (its seconds are a lower bound)."""


def sh(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float | None = None
) -> float:
    """Run a command to its end, or stop it and its children at `timeout` (Stopped); its wall
    seconds (stderr's tail on failure)."""
    t0 = time.perf_counter()
    # Its own session, so that a stop ends the process group we started, and only that.
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise Stopped(" ".join(args)) from None
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} in {cwd}: {out[-1500:]}{err[-1500:]}")
    return time.perf_counter() - t0


def layout_files(
    name: str, rev: str, images: list[str], work: Path, shard_mb: float | None = None
) -> tuple[dict[str, list[str]], str, float | None]:
    """Every file of DIFF's recipe's stores, latents and trajectories as the plan of `rev`'s code
    lists them, what its dvc.yaml's train stage depends on for the stores, and its shard_mb
    (None where the code has none)."""
    tree = ROOT
    if rev != ".":
        tree = work / "trees" / name
        if not tree.exists():
            sh(["git", "worktree", "add", "--detach", "-f", str(tree), rev], ROOT)
    code = (
        "import json, sys\n"
        "from pipeline.core.params import load_params, apply_recipe\n"
        "from pipeline.plan.budget import plan\n"
        f"p = apply_recipe(load_params('params.yaml'), load_params({RECIPE!r}))\n"
        f"if {shard_mb!r} is not None and 'shard_mb' in p['extract']:\n"
        f"    p['extract']['shard_mb'] = {shard_mb!r}\n"
        f"images = {{k: int(v) for k, v in (a.split('=') for a in {images!r})}}\n"
        "b = plan(p, images, count_flops=False)\n"
        "json.dump([b.store_files, p['extract'].get('shard_mb')], sys.stdout)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"plan of {rev}: {out.stderr[-2000:]}")
    train = yaml.safe_load((tree / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    files, mb = json.loads(out.stdout)
    return files, next(d for d in train if d.startswith("data/features")), mb


def reused(project: Path, files: dict[str, list[str]]) -> float | None:
    """The first repro's seconds of a project an earlier run built completely for these files
    (from the layout list's time to dvc.lock's), committing its stores if that run did not;
    None where there is none to reuse."""
    layout = project.parent / f"{project.name}.layout.json"
    lock = project / "dvc.lock"
    if not (layout.is_file() and lock.is_file() and (project / "metrics.json").is_file()):
        return None
    if layout.read_text() != json.dumps(files) or "evaluate" not in yaml.safe_load(
        lock.read_text()
    ).get("stages", {}):
        return None
    seconds = lock.stat().st_mtime - layout.stat().st_mtime
    sh(["git", "add", "-A"], project)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=project).returncode:
        sh(["git", "commit", "-qm", "stores"], project)
    return seconds


def build(
    project: Path, files: dict[str, list[str]], timesteps: list[int], log: Path, stores_dep: str
) -> float:
    """The scratch project, its stores written by `dvc repro` and committed; the seconds of that
    first repro (DVC hashing and caching every file). `stores_dep` is what train and evaluate
    depend on for the stores, as the measured code's dvc.yaml has it: the stores' folder, or
    the small digests extract@t writes beside them."""
    if project.exists():
        shutil.rmtree(project)
    project.mkdir(parents=True)
    layout = project.parent / f"{project.name}.layout.json"
    layout.write_text(json.dumps(files))
    (project / "stage.py").write_text(STAGE)
    (project / "params.yaml").write_text(f"timesteps: {timesteps}\ntrain:\n  lr: 0.0\n")
    py = sys.executable
    digest_cmd = digest_out = ""
    if stores_dep == "data/features/digests":
        digest_cmd = f" && {py} stage.py digest ${{item.timestep}} {log}"
        digest_out = "\n      - data/features/digests/t${item.timestep}.json"
    # The graph of dvc.yaml where it touches the big outputs: encode, invert, extract@t per
    # timestep, and train and evaluate reading them.
    (project / "dvc.yaml").write_text(
        f"""stages:
  encode:
    cmd: {py} stage.py write encoded/ {layout} {log}
    deps: [stage.py]
    outs: [data/encoded]
  invert:
    cmd: {py} stage.py write trajectories/ {layout} {log}
    deps: [stage.py, data/encoded]
    outs: [data/trajectories]
  extract:
    matrix:
      timestep: ${{timesteps}}
    cmd: {py} stage.py write features/t${{item.timestep}}/ {layout} {log}{digest_cmd}
    deps: [stage.py, data/encoded, data/trajectories]
    outs:
      - data/features/t${{item.timestep}}:
          persist: true{digest_out}
  train:
    cmd: {py} stage.py train {log}
    deps: [stage.py, data/encoded, {stores_dep}]
    params: [train.lr]
    outs: [data/heads]
  evaluate:
    cmd: {py} stage.py evaluate {log}
    deps: [data/encoded, {stores_dep}, data/heads]
    metrics:
      - metrics.json:
          cache: false
"""
    )
    sh(["git", "init", "-q"], project)
    sh(["git", "config", "user.email", "bench@example.com"], project)
    sh(["git", "config", "user.name", "bench"], project)
    sh(["dvc", "init", "-q"], project)
    # The project's own cache settings (.dvc/config), as a user's clone has them.
    for line in (ROOT / ".dvc" / "config").read_text().splitlines():
        key = line.split("#")[0].strip()
        if key.startswith("type"):
            sh(["dvc", "config", "cache.type", key.split("=", 1)[1].strip().strip('"')], project)
    sh(
        ["dvc", "remote", "add", "-d", "bench", str(project.parent / f"{project.name}.remote")],
        project,
    )
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "scratch project"], project)
    seconds = sh(["dvc", "repro", "-q"], project)
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "stores"], project)
    return seconds


def stage_seconds(log: Path, since: float) -> tuple[float, float, int]:
    """(first stage start, the stages' own seconds, stages run) noted after `since`."""
    events = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    events = [e for e in events if e["t"] >= since]
    starts = [e for e in events if e["event"] == "start"]
    ends = [e for e in events if e["event"] == "end"]
    own = sum(e["t"] for e in ends) - sum(e["t"] for e in starts)
    return (min(e["t"] for e in starts) if starts else float("nan"), own, len(ends))


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def metric(project: Path, name: str) -> float:
    """The metric of experiment `name` (what its evaluate stage wrote)."""
    out = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=project, capture_output=True, text=True
    )
    for baseline in json.loads(out.stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") == name:
                    return float(rev["data"]["metrics"]["metrics.json"]["data"]["lr"])
    raise RuntimeError(f"no experiment {name} in `dvc exp show`")


def wait_queue(project: Path, log: Path, since: float, timeout: float | None = None) -> None:
    """Until the queued experiment's evaluate stage has ended and no worker runs any more."""
    while time.time() - since < (timeout or 6 * 3600):
        done = stage_seconds(log, since)[2] >= 2
        status = subprocess.run(
            ["dvc", "queue", "status"], cwd=project, capture_output=True, text=True
        ).stdout
        if "Failed" in status:
            raise RuntimeError(f"queued experiment failed: {status}")
        if done and "Running" not in status and "Queued" not in status:
            return
        time.sleep(2)
    sh(["dvc", "queue", "stop", "--kill"], project)
    raise Stopped("dvc queue start")


def measure(
    command: str, project: Path, log: Path, lr: float, t_pull: int, timeout: float | None = None
) -> dict[str, float]:
    """One timing of `command` in `project`: wall seconds, and for experiments the seconds to the
    first stage and the DVC overhead (wall less the stages' own seconds); at `timeout`, the
    command is stopped and its seconds recorded as a lower bound (`stopped`)."""
    try:
        return _measure(command, project, log, lr, t_pull, timeout)
    except Stopped:
        return {"seconds": float(timeout or 0), "stopped": 1.0}


def _measure(
    command: str, project: Path, log: Path, lr: float, t_pull: int, timeout: float | None
) -> dict[str, float]:
    if command == "status":
        return {"seconds": sh(["dvc", "status", "-q"], project, timeout=timeout)}
    if command == "repro_noop":
        return {"seconds": sh(["dvc", "repro", "-q"], project, timeout=timeout)}
    if command in ("exp_run", "exp_temp", "exp_queue"):
        start = time.time()
        name = f"lr{str(lr).replace('.', '-')}"
        args = ["dvc", "exp", "run", "-S", f"train.lr={lr}", "-n", name]
        if command == "exp_queue":
            sh([*args, "--queue"], project, timeout=timeout)
            sh(["dvc", "queue", "start"], project)
            wait_queue(project, log, start, timeout)
            wall = time.time() - start
        else:
            temp = ["--temp"] if command == "exp_temp" else []
            wall = sh([*args, *temp], project, timeout=timeout)
        first, own, n = stage_seconds(log, start)
        got = metric(project, name)
        if n != 2 or got != lr:
            raise RuntimeError(f"{command}: {n} stages ran, metric {got} != lr {lr}")
        return {"seconds": wall - own, "to_first_stage": first - start}
    if command == "push":
        remote = project.parent / f"{project.name}.remote"
        shutil.rmtree(remote, ignore_errors=True)
        return {"seconds": sh(["dvc", "push", "-q"], project, timeout=timeout)}
    if command == "pull_one_t":
        clone = project.parent / f"{project.name}.clone"
        shutil.rmtree(clone, ignore_errors=True)
        sh(["git", "clone", "-q", str(project), str(clone)], project.parent)
        seconds = sh(["dvc", "pull", "-q", f"extract@{t_pull}"], clone, timeout=timeout)
        got = count_files(clone / "data/features" / f"t{t_pull}")
        want = count_files(project / "data/features" / f"t{t_pull}")
        shutil.rmtree(clone, ignore_errors=True)
        if got != want:
            raise RuntimeError(f"pull of t{t_pull}: {got} files, {want} in the project")
        return {"seconds": seconds, "files": got}
    if command == "gc":
        return {"seconds": sh(["dvc", "gc", "-w", "-f", "-q"], project, timeout=timeout)}
    raise ValueError(command)


def fit(results: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Per command, seconds = a + b x files over the work tree's layouts (medians; least
    squares): the plan's estimate of each command's DVC overhead at a run's file count."""
    out: dict[str, Any] = {}
    if len({results["layouts"][n]["files"] for n in names}) < 2:
        return out
    for command in results["layouts"][names[0]]["commands"]:
        xs = [results["layouts"][n]["files"] for n in names]
        ys = [results["layouts"][n]["commands"][command]["seconds"]["median"] for n in names]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
        b /= sum((x - mx) ** 2 for x in xs)
        out[command] = {
            "intercept_s": round(my - b * mx, 3),
            "per_1000_files_s": round(b * 1000, 4),
            "layouts": names,
        }
    return out


def summary(values: list[float], stopped: bool = False) -> dict[str, Any]:
    out = {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "all": [round(v, 2) for v in values],
    }
    return {**out, "stopped": True} if stopped else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["after=."], metavar="NAME=REV")
    ap.add_argument("--images", nargs="+", default=GTA, metavar="DOMAIN=N")
    ap.add_argument(
        "--count-only",
        nargs="*",
        default=[],
        metavar="NAME=REV",
        help="layouts whose files are counted (the plan of that code), not timed",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--large-timeout", type=float, default=600, help="seconds (a lower bound)")
    ap.add_argument("--reuse", action="store_true", help="a project built for the same files")
    ap.add_argument("--shard-mb", type=float, help="extract.shard_mb, where the code has it")
    ap.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=COMMANDS)
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "dvc_scale")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    run = Run()
    specs = dict(item.split("=", 1) for item in args.layouts)
    layouts = {n: spec.split("@")[0] for n, spec in specs.items()}
    shard_mbs = {
        n: float(spec.split("@")[1]) if "@" in spec else args.shard_mb for n, spec in specs.items()
    }
    args.work.mkdir(parents=True, exist_ok=True)
    log = (args.work / "stages.log").absolute()
    log.unlink(missing_ok=True)
    results: dict[str, Any] = {"images": args.images, "recipe": RECIPE, "layouts": {}}
    for name, rev in (item.split("=", 1) for item in args.count_only):
        files, stores_dep, shard_mb = layout_files(name, rev, args.images, args.work, None)
        stores = [k for k in files if k.startswith("features/")]
        results["layouts"][name] = {
            "rev": rev,
            "shard_mb": shard_mb,
            "files": sum(map(len, files.values())),
            "stores_dep": stores_dep,
            "store_files": sum(len(files[k]) for k in stores),
            "stores": len(stores),
            "counted_only": True,
            "commands": {},
        }
    projects = {}
    for name, rev in layouts.items():
        files, stores_dep, shard_mb = layout_files(
            name, rev, args.images, args.work, shard_mbs[name]
        )
        stores = [k for k in files if k.startswith("features/")]
        timesteps = sorted({int(k.split("/")[1][1:]) for k in stores}, reverse=True)
        project = args.work / name
        print(f"{name}: {sum(map(len, files.values())):,} files; building", flush=True)
        first = (reused(project, files) if args.reuse else None) or build(
            project, files, timesteps, log, stores_dep
        )
        outs = ["encoded", "trajectories", *(f"features/t{t}" for t in timesteps)]
        n = sum(count_files(project / "data" / out) for out in outs)
        run.check(n == sum(map(len, files.values())), f"{name}: project files", n)
        per_t = sum(len(v) for k, v in files.items() if k.startswith(f"features/t{timesteps[0]}/"))
        projects[name] = (project, timesteps[0])
        results["layouts"][name] = {
            "rev": rev if rev != "." else run.commit,
            "shard_mb": shard_mb,
            "files": n,
            "stores_dep": stores_dep,
            "store_files": sum(len(files[k]) for k in stores),
            "files_one_timestep": per_t,
            "stores": len(stores),
            "first_repro_s": round(first, 1),
            "commands": {},
        }
        print(f"{name}: first dvc repro {first:.0f} s", flush=True)
    lr = 0.0
    samples: dict[str, dict[str, list[dict[str, float]]]] = {n: {} for n in layouts}
    large = {n for n in layouts if results["layouts"][n]["files"] > LARGE}
    order = [(r, c, n) for r in range(args.rounds) for c in args.commands for n in projects]
    order = [x for x in order if x[2] not in large] + [
        (0, c, n) for c in args.commands for n in projects if n in large
    ]
    for r, command, name in order:
        project, t_pull = projects[name]
        lr += 0.5
        timeout = args.large_timeout if name in large else None
        got = measure(command, project, log, lr, t_pull, timeout)
        samples[name].setdefault(command, []).append(got)
        print(f"round {r} {name} {command}: {got}", flush=True)
    for name in layouts:
        for command, got in samples[name].items():
            stopped = any(g.get("stopped") for g in got)
            results["layouts"][name]["commands"][command] = {
                key: summary([g[key] for g in got], stopped) for key in got[0] if key != "stopped"
            }
    results["fit"] = fit(results, [n for n, rev in layouts.items() if rev == "."])
    run.write(args.out, results)


if __name__ == "__main__":
    main()
