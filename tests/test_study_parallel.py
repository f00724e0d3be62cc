"""``sfedlora study --jobs N`` (sfedlora.studies.parallel): up to N runs at once, each
started as soon as what it depends on has finished, giving the study the one-process
path gives. The launcher is the runner's parameter: here one whose processes write the
run files a study reads after a fixed number of polls."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sfedlora.config import load_config
from sfedlora.studies.parallel import run_batched, run_parallel
from sfedlora.studies.plan import PlanError
from sfedlora.studies.protocol import PlannedStudy
from tests.test_study_protocol import CONFIG, PLAN, FakeRuns


def _val_loss(arm, lr, seed):  # lowest rate best for sfed (the ladder extends), mid for local
    return lr if arm == "sfed" else abs(lr - 4e-3)


class FakeLaunch:
    """Starts a 'process' that finishes ``polls`` polls later by writing its run's files
    (FakeRuns' figures), or fails for run directories in ``fail``; records when each
    starts and how many ran at once."""

    def __init__(self, study_of, polls=2, fail: tuple[str, ...] = (), on_start=None):
        """``polls``: how many polls a run takes, or a function of its rate."""
        self.study_of, self.polls, self.fail, self.on_start = study_of, polls, fail, on_start
        self.files = FakeRuns(_val_loss)
        self.running: list[_Process] = []
        self.started: list[tuple[str, str, bool]] = []  # (arm, stage, selection finished)
        self.most = 0

    def __call__(self, args: list[str], log_file: Path) -> _Process:
        assert args[3] == "run" and args[-1] == "--overwrite"
        settings = dict(a.split("=", 1) for a in args[5:-1])
        run_dir = Path(settings["output_dir"])
        arm, stage = settings["method"], run_dir.parents[1].name
        self.started.append((arm, stage, self.study_of().selection_finished(arm)))
        process = _Process(self, run_dir, arm, float(settings["local.lr"]),
                           int(settings["seed"]))
        self.running.append(process)
        self.most = max(self.most, len(self.running))
        if self.on_start:
            self.on_start(self)
        return process


class _Process:
    def __init__(self, launch, run_dir, arm, lr, seed):
        self.launch, self.run_dir, self.arm, self.lr, self.seed = launch, run_dir, arm, lr, seed
        self.left = launch.polls(lr) if callable(launch.polls) else launch.polls

    def poll(self) -> int | None:
        self.left -= 1
        if self.left > 0:
            return None
        self.launch.running.remove(self)
        if any(part in str(self.run_dir) for part in self.launch.fail):
            return 1
        self.launch.files._write(self.run_dir, self.arm, self.lr, self.seed, [])
        return 0


def _study(folder: Path, extend: int = 1, **kwargs) -> PlannedStudy:
    """The test plan, extending the ladder up to ``extend`` times; the one-process
    runner (which writes the tables at the end) is FakeRuns, which keeps the runs it
    finds."""
    folder.mkdir()
    (folder / "plan.yaml").write_text(yaml.safe_dump({**PLAN, "extend": extend}))
    return PlannedStudy.load(folder / "plan.yaml", root=CONFIG.parents[1],
                             **{"runner": FakeRuns(_val_loss), **kwargs})


def test_jobs_run_at_most_n_at_once_and_give_the_one_process_study(tmp_path):
    (tmp_path / "one").mkdir(), (tmp_path / "many").mkdir()
    sequential = _study(tmp_path / "one" / "study", extend=2)
    assert sequential.run("all")
    study = _study(tmp_path / "many" / "study", extend=2)
    launch = FakeLaunch(lambda: study)
    assert run_parallel(study, "all", None, jobs=3, launch=launch, poll_seconds=0)

    assert launch.most == 3
    # 3 + 2 (the extensions) rungs x 2 seeds for sfed, 3 x 2 for local, 5 + 5
    assert len(launch.started) == 10 + 6 + 10
    assert all(done for arm, stage, done in launch.started if stage == "report")
    for arm in PLAN["arms"]:
        assert study.choice(arm) == sequential.choice(arm)
        assert sorted(study.reporting_runs(arm)) == [0, 1, 2, 3, 4]
    assert study.choice("sfed")[0] == {"local.lr": 6.25e-5}  # the second extension
    assert study.choice("local")[0] == {"local.lr": 4e-3}
    # one arm's reporting runs started while the other was still selecting
    order = [(arm, stage) for arm, stage, _ in launch.started]
    assert order.index(("local", "report")) < max(
        i for i, (arm, stage) in enumerate(order) if (arm, stage) == ("sfed", "select"))
    assert study.page() == sequential.page().replace("/one/", "/many/")
    assert (study.folder / "report.md").read_text() == study.page()


def test_a_failed_run_is_named_and_the_other_runs_finish(tmp_path):
    study = _study(tmp_path / "study")
    launch = FakeLaunch(lambda: study, fail=("local/report/runs/local.lr-0.004__seed-3",))
    with pytest.raises(PlanError, match=r"1 run\(s\) failed: .*seed-3 \(log: "):
        run_parallel(study, "all", None, jobs=2, launch=launch, poll_seconds=0)
    assert sorted(study.reporting_runs("local")) == [0, 1, 2, 4]
    assert sorted(study.reporting_runs("sfed")) == [0, 1, 2, 3, 4]


def test_the_select_stage_alone_starts_no_reporting_run(tmp_path):
    study = _study(tmp_path / "study")
    launch = FakeLaunch(lambda: study)
    assert run_parallel(study, "select", ["sfed"], jobs=4, launch=launch, poll_seconds=0)
    assert {stage for _, stage, _ in launch.started} == {"select"}
    assert study.selection_finished("sfed") and not study.reporting_runs("sfed")


def test_each_launched_command_is_the_run_the_plan_describes(tmp_path):
    study = _study(tmp_path / "study")
    commands = []

    def launch(args, log_file):
        commands.append(args)
        raise SystemExit  # stop after the first start

    with pytest.raises(SystemExit):
        run_parallel(study, "all", ["local"], jobs=1, launch=launch, poll_seconds=0)
    (args,) = commands
    config = load_config(args[4], args[5:-1])
    assert Path(args[4]) == CONFIG
    assert (config.method, config.local.lr, config.seed) == ("local", 1e-3, 100)
    assert (config.rounds, config.eval.every, config.clients.num) == (4, 2, 4)
    assert Path(config.output_dir) == study.stage_dir("local", "select") / "runs" / \
        "local.lr-0.001__seed-100"


def test_jobs_and_shard_together_are_refused(tmp_path):
    study = _study(tmp_path / "study", shard="0/2")
    with pytest.raises(PlanError, match="--jobs and --shard"):
        run_parallel(study, "all", None, jobs=2, launch=None)


def test_the_study_is_asked_again_only_when_a_run_ends(tmp_path, monkeypatch):
    """Finding what is due reads every run's config; asked on every poll, the parent
    took a quarter of a core from the runs it waits on."""
    study = _study(tmp_path / "study")
    asked = []
    original = PlannedStudy.due
    monkeypatch.setattr(PlannedStudy, "due",
                        lambda self, arm: asked.append(arm) or original(self, arm))
    launch = FakeLaunch(lambda: study, polls=10)
    assert run_parallel(study, "select", None, jobs=2, launch=launch, poll_seconds=0)
    ends = len(launch.started)  # each run ends once; the first ask precedes them all
    assert len(asked) <= len(PLAN["arms"]) * (ends + 1)


def test_a_run_another_process_is_writing_is_not_started_twice_and_counts_toward_n(
        tmp_path):
    """An earlier parent's run, or one started by hand: its directory's lock is held.
    This parent leaves it, runs one fewer of its own, and takes it over once the other
    process lets go without finishing it (it crashed)."""
    import fcntl
    import os

    study = _study(tmp_path / "study")
    held = study.stage_dir("local", "select") / "runs" / "local.lr-0.016__seed-101"
    held.mkdir(parents=True)
    fd = os.open(held / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    seen = {"most_while_held": 0}

    def on_start(launch):
        if fd in seen.values():  # released already
            return
        seen["most_while_held"] = max(seen["most_while_held"], len(launch.running))
        assert all(p.run_dir != held for p in launch.running)
        if len(launch.started) == 4:
            seen["released"] = fd
            os.close(fd)  # the other process dies

    launch = FakeLaunch(lambda: study, on_start=on_start)
    assert run_parallel(study, "select", None, jobs=2, launch=launch, poll_seconds=0)
    assert seen["most_while_held"] == 1 and launch.most == 2
    assert study.selection_finished("local")
    assert (held / "summary.json").is_file()  # this parent ran it in the end


def test_an_arm_borrowing_a_rung_reports_only_after_its_source_has_chosen(tmp_path):
    """rung_from (the learning-rate-transfer plans): the borrowing arm selects nothing
    and its reporting runs wait for its source's selection, at the source's rung."""
    folder = tmp_path / "study"
    folder.mkdir()
    arms = {**PLAN["arms"],
            "sfed-at-local-rate": {"settings": ["method=sfed"], "rung_from": "local"}}
    (folder / "plan.yaml").write_text(yaml.safe_dump({**PLAN, "arms": arms, "extend": 1}))
    study = PlannedStudy.load(folder / "plan.yaml", root=CONFIG.parents[1],
                              runner=FakeRuns(_val_loss))
    starts = []

    def on_start(launch):
        starts.append((launch.running[-1].run_dir, study.selection_finished("local")))

    # the lowest rung ends first, so the source has a complete rung long before its
    # selection ends; every run can start at once
    launch = FakeLaunch(lambda: study, on_start=on_start,
                        polls=lambda lr: 1 if lr == 1e-3 else 6)
    assert run_parallel(study, "all", None, jobs=30, launch=launch, poll_seconds=0)
    borrowed = [(d, done) for d, done in starts if "sfed-at-local-rate" in str(d)]
    assert len(borrowed) == 5 and all(done for _, done in borrowed)
    assert all("/report/" in str(d) for d, _ in borrowed)
    assert study.choice("sfed-at-local-rate")[0] == study.choice("local")[0] == \
        {"local.lr": 4e-3}


class FakeTogether:
    """Stands in for ``run_together``: writes each run's files (FakeRuns' figures), or
    returns an exception for run directories in ``fail``; records each batch."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.files, self.fail = FakeRuns(_val_loss), fail
        self.batches: list[list[tuple[str, str]]] = []

    def __call__(self, configs):
        self.batches.append([(cfg.method, Path(cfg.output_dir).parents[1].name)
                             for _, cfg in configs])
        out = {}
        for name, cfg in configs:
            if any(part in name for part in self.fail):
                out[name] = RuntimeError("a client's data is corrupt")
                continue
            self.files._write(Path(cfg.output_dir), cfg.method, cfg.local.lr, cfg.seed, [])
            out[name] = {}
        return out


def test_batched_runs_every_ready_run_in_one_batch_and_gives_the_one_process_study(
        tmp_path):
    (tmp_path / "one").mkdir(), (tmp_path / "many").mkdir()
    sequential = _study(tmp_path / "one" / "study", extend=2)
    assert sequential.run("all")
    study = _study(tmp_path / "many" / "study", extend=2)
    together = FakeTogether()
    assert run_batched(study, "all", None, batched=8, together=together)

    sizes = [len(batch) for batch in together.batches]
    assert max(sizes) == 8 and sum(sizes) == 10 + 6 + 10  # as with --jobs
    # the first batch is selection only, and fills up while runs are ready
    assert {stage for _, stage in together.batches[0]} == {"select"}
    for i, batch in enumerate(together.batches):  # an arm reports after it has chosen
        for arm, stage in batch:
            if stage == "report":
                assert all((arm, "select") not in later for later in together.batches[i:])
    for arm in PLAN["arms"]:
        assert study.choice(arm) == sequential.choice(arm)
    assert study.page() == sequential.page().replace("/one/", "/many/")


def test_a_failed_batched_run_is_named_and_the_others_finish(tmp_path):
    study = _study(tmp_path / "study")
    together = FakeTogether(fail=("local/report/runs/local.lr-0.004__seed-3",))
    with pytest.raises(PlanError, match=r"1 run\(s\) failed: .*seed-3 \(RuntimeError"):
        run_batched(study, "all", None, batched=4, together=together)
    assert sorted(study.reporting_runs("local")) == [0, 1, 2, 4]
    assert sorted(study.reporting_runs("sfed")) == [0, 1, 2, 3, 4]


def test_batched_and_jobs_or_shard_together_are_refused(tmp_path):
    study = _study(tmp_path / "study", shard="0/2")
    with pytest.raises(PlanError, match="--batched and --shard"):
        run_batched(study, "all", None, batched=4, together=FakeTogether())
