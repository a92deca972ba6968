"""Fast checks of launch/sweep.py's input handling: every bad input fails before Ray starts, in one
line naming the key, and the pieces that translate a sweep config behave (no Ray cluster here)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from launch.cluster import ClusterResourceError, NodeCapacity, check_trial_fits, workers_that_fit
from launch.ray_trial import FAULT_ENV, FaultInjector, RayReporter
from launch.search_space import apply_params, as_overrides, to_param_space
from launch.spec import ResourceSpec, SweepConfigError, check_reporting, grid_size, parse_sweep, validate_against
from launch.sweep import compose, main
from vitscale.config import resolve_model


def _demo(*overrides: str):
    return compose(["+sweep=demo", *overrides])


def _run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def test_demo_config_composes_with_its_base_experiment() -> None:
    cfg = _demo()
    spec = parse_sweep(cfg)
    validate_against(cfg, spec)
    check_reporting(cfg, spec)
    assert cfg.name == "demo_pretrain" and resolve_model(cfg).embed_dim == 96  # from +experiment=demo_pretrain
    assert spec.metric == "eval/top1" and spec.mode == "max" and spec.scheduler.type == "asha"
    assert set(spec.search_space) == {"optim.lr", "optim.weight_decay"}
    assert spec.search_space["optim.lr"].kind == "loguniform"
    assert grid_size(spec) == spec.num_samples == 4


def test_paper_lr_sweep_composes() -> None:
    cfg = compose(["+sweep=vit_b16_lr", "data.val_shards='/data/i21k/val-{000000..000099}.tar'"])
    spec = parse_sweep(cfg)
    validate_against(cfg, spec)
    check_reporting(cfg, spec)
    assert resolve_model(cfg).embed_dim == 768 and spec.search_space["optim.lr"].kind == "grid"


def test_cli_overrides_reach_training_and_sweep_keys() -> None:
    cfg = _demo("optim.weight_decay=0.3", "sweep.num_samples=7")
    assert cfg.optim.weight_decay == 0.3 and parse_sweep(cfg).num_samples == 7


def test_unknown_search_key_is_one_line_error_before_ray(capsys) -> None:
    code, err = _run_cli(capsys, "+sweep=demo", "+sweep.search_space={optim.lrate: {choice: [1, 2]}}")
    assert code == 2
    assert "sweep.search_space.optim.lrate" in err and "does not exist" in err and "lr" in err
    assert len(err.splitlines()) == 1
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


@pytest.mark.parametrize("override, expected", [
    ("+sweep.search_space={model.pool: {loguniform: [1, 10]}}", "needs a number"),
    ("+sweep.search_space={optim.eps: {loguniform: [0, 1]}}", "low > 0"),
    ("+sweep.search_space={optim.eps: {uniform: [2, 1]}}", "low < high"),
    ("+sweep.search_space={optim.eps: {normal: [0, 1]}}", "expected one of"),
    ("+sweep.search_space={optim: {choice: [1]}}", "section"),
    ("+sweep.search_space={optim.eps: {choice: [fast, slow]}}", "is a number"),
    ("sweep.mode=maximum", "sweep.mode"),
    ("sweep.scheduler.type=pbt", "sweep.scheduler.type"),
    ("sweep.scheduler.grace_period=100000", "exceeds max_t"),
    ("+sweep.typo=1", "sweep.typo: unknown key"),
    ("sweep.metric=loss", "evaluation metrics"),
    ("eval.every=0", "eval.every must be > 0"),
    ("trainer.checkpoint_every=150", "multiple of eval.every"),
])
def test_bad_sweep_inputs_fail_fast(capsys, override: str, expected: str) -> None:
    code, err = _run_cli(capsys, "+sweep=demo", override, "--dry-run")
    assert code == 2 and expected in err, err
    assert len(err.splitlines()) == 1


def test_missing_shards_named_before_ray(capsys, tmp_path: Path) -> None:
    code, err = _run_cli(capsys, "+sweep=demo", f"data.train_shards={tmp_path}/nope-000000.tar")
    assert code == 2 and "data.train_shards" in err and "nope-000000.tar" in err


def test_resources_beyond_this_machine_fail_before_ray(capsys, tmp_path: Path) -> None:
    shard = tmp_path / "x-000000.tar"
    shard.write_bytes(b"")
    code, err = _run_cli(capsys, "+sweep=demo", f"data.train_shards={shard}", f"data.val_shards={shard}",
                         "sweep.resources.num_workers=512")
    assert code == 2 and "sweep.resources" in err and "512 workers" in err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_missing_sweep_argument(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["optim.lr=1"])
    assert "+sweep=NAME" in capsys.readouterr().err


def test_worker_fit_counts_per_node() -> None:
    gpu = ResourceSpec(num_workers=2, cpus_per_worker=4, gpus_per_worker=1)
    two_nodes = [NodeCapacity(cpus=8, gpus=1), NodeCapacity(cpus=8, gpus=1)]
    assert workers_that_fit(two_nodes, gpu) == 2
    assert check_trial_fits(two_nodes, gpu, "test") == 1
    # 2 GPUs in total, but no node holds the 2 a single worker asks for.
    with pytest.raises(ClusterResourceError, match="gpus_per_worker"):
        check_trial_fits(two_nodes, ResourceSpec(num_workers=1, cpus_per_worker=1, gpus_per_worker=2), "test")
    assert check_trial_fits([NodeCapacity(cpus=16, gpus=0)], ResourceSpec(2, 2, 0), "test") == 4


def test_param_space_and_trial_overrides() -> None:
    from ray.tune.search.sample import Categorical, Float

    cfg = _demo("+sweep.search_space={model.drop_path: {grid: [0.0, 0.1]}}")
    spec = parse_sweep(cfg)
    space = to_param_space(spec.search_space)
    assert isinstance(space["optim.lr"], Float) and isinstance(space["optim.weight_decay"], Categorical)
    assert space["model.drop_path"] == {"grid_search": [0.0, 0.1]}
    assert grid_size(spec) == 2 * spec.num_samples
    # Interpolations that read a swept key follow it (finetune.num_classes: ${data.num_classes}).
    trial = apply_params(cfg, {"data.num_classes": 3, "optim.lr": 5e-4})
    assert trial.finetune.num_classes == 3 and trial.optim.lr == 5e-4 and cfg.optim.lr == 1e-3
    with pytest.raises(KeyError, match="optim.lrr"):
        apply_params(cfg, {"optim.lrr": 1})
    assert as_overrides({"optim.lr": 0.000123456789, "model.pool": "gap"}) == "model.pool=gap optim.lr=0.000123457"


def test_trial_config_is_a_resolved_training_config(tmp_path: Path, monkeypatch) -> None:
    from launch.ray_trial import TrialPlan, forwarded_env, trial_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    cfg = _demo()
    base = OmegaConf.to_container(cfg, resolve=False)
    env = forwarded_env(base)
    # the config reads MLFLOW_TRACKING_URI through ${oc.env:...}: trials must see the driver's value
    assert env["MLFLOW_TRACKING_URI"] == "http://tracking:5000" and "RAY_ADDRESS" not in env
    plan = TrialPlan(base_config=base, sweep_name="demo", trials_dir=str(tmp_path / "trials"),
                     storage_path=str(tmp_path / "ray"), num_workers=2, cpus_per_worker=1, gpus_per_worker=0,
                     max_failures=1, parent_run_id="parent123", launch_cwd=str(tmp_path))
    trial = trial_config(plan, {"optim.lr": 1e-3, "data.num_classes": 7}, "abc_00001")
    assert "sweep" not in trial and trial["optim"]["lr"] == 1e-3 and trial["finetune"]["num_classes"] == 7
    assert trial["output_dir"] == str(tmp_path / "trials" / "abc_00001") and trial["resume"] is None
    assert trial["tracking"]["uri"] == "http://tracking:5000"
    assert trial["tracking"]["parent_run_id"] == "parent123" and trial["tracking"]["trial_id"] == "abc_00001"
    assert trial["tracking"]["register_name"] is None  # only the driver registers, the best trial


def test_parse_rejects_missing_block() -> None:
    with pytest.raises(SweepConfigError, match=r"\+sweep=NAME"):
        parse_sweep(compose([]))


# ------------------------------------------------------------------ reporting to Ray (no Ray needed)
class _FakeRayTrain:
    """Stands in for ray.train.report / Checkpoint to record what the reporter sends, and when."""

    def __init__(self) -> None:
        self.reports: list[tuple[dict, list[str] | None]] = []

    def report(self, metrics, checkpoint=None):
        files = None
        if checkpoint is not None:
            root = Path(checkpoint.path)
            files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        self.reports.append((dict(metrics), files))

    class Checkpoint(SimpleNamespace):
        @classmethod
        def from_directory(cls, path):
            return cls(path=path)


@pytest.fixture
def fake_report(monkeypatch):
    import ray.train

    fake = _FakeRayTrain()
    monkeypatch.setattr(ray.train, "report", fake.report)
    monkeypatch.setattr(ray.train, "Checkpoint", _FakeRayTrain.Checkpoint)
    return fake


def _reporter(tmp_path: Path, local_rank: int = 0) -> RayReporter:
    cfg = OmegaConf.create({"trainer": {"max_steps": 8, "checkpoint_every": 4}, "output_dir": str(tmp_path)})
    return RayReporter(cfg, rank=local_rank, local_rank=local_rank, resumed_from=None)


def _tag(tmp_path: Path, step: int) -> str:
    tag = tmp_path / "checkpoints" / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "rank_0.pt").write_bytes(b"x")
    return str(tag)


def test_reporter_pairs_eval_and_checkpoint_in_both_orders(tmp_path: Path, fake_report) -> None:
    rep = _reporter(tmp_path)
    rep.on_eval({"eval/top1": 0.2}, 2)                                   # no checkpoint at 2: at once
    rep.on_log({"loss": 1.0}, 4)
    rep.on_eval({"eval/top1": 0.4}, 4)                                   # checkpoint follows at 4
    rep.on_checkpoint(4, _tag(tmp_path, 4), {"loss": 1.0})
    rep.on_log({"loss": 0.5}, 8)
    rep.on_checkpoint(8, _tag(tmp_path, 8), {"loss": 0.5})              # last step: checkpoint first
    rep.on_eval({"eval/top1": 0.7}, 8)                                   # ... then the final eval
    rep.flush()
    steps = [(m["step"], m.get("eval/top1"), files) for m, files in fake_report.reports]
    assert steps == [
        (2, 0.2, None),
        (4, 0.4, ["latest", "step_00000004/rank_0.pt"]),
        (8, 0.7, ["latest", "step_00000008/rank_0.pt"]),
    ]
    assert all(m["resumed_from_step"] == -1 for m, _ in fake_report.reports)


def test_reporter_other_local_ranks_report_without_files(tmp_path: Path, fake_report) -> None:
    rep = _reporter(tmp_path, local_rank=1)
    rep.on_eval({"eval/top1": 0.4}, 4)
    rep.on_checkpoint(4, _tag(tmp_path, 4), {"loss": 1.0})
    assert fake_report.reports == [({"eval/top1": 0.4, "loss": 1.0, "resumed_from_step": -1, "step": 4}, None)]


def test_fault_spec_parsing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(FAULT_ENV, f"rank=1,step=5,marker={tmp_path}/m")
    assert FaultInjector.from_env(0) is None
    injector = FaultInjector.from_env(1)
    assert injector is not None and injector.step == 5 and injector.marker == tmp_path / "m"
    monkeypatch.setenv(FAULT_ENV, "rank=1")
    with pytest.raises(ValueError, match=FAULT_ENV):
        FaultInjector.from_env(1)


def test_cluster_yaml_is_a_valid_ray_cluster_config(repo_root: Path) -> None:
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((repo_root / "launch" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own schema and consistency checks (`ray up`)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["trial_slot"] >= 1 and head["resources"]["CPU"] == 0
