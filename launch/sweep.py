"""Hyper-parameter sweeps of distributed vitscale training runs: Ray Tune + Ray Train + MLflow.

    python launch/sweep.py +sweep=demo                      # embedded Ray on this machine
    python launch/sweep.py +sweep=vit_b16_lr --address ray://head:10001 sweep.num_samples=8
    RAY_ADDRESS=head:6379 python launch/sweep.py +sweep=vit_b16_lr optim.weight_decay=0.05
    python launch/sweep.py +sweep=demo --dry-run            # validate and print the plan only

The overrides are Hydra overrides of the same configs/ tree vitscale/train.py composes (root
configs/train.yaml); a sweep config adds the `sweep:` block. See docs/sweeps.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/sweep.py`: make launch/ and vitscale/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("vitscale.sweep")


def compose(overrides: list[str]) -> DictConfig:
    """The training root config with the user's overrides, exactly as vitscale/train.py composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="launch/sweep.py", description=__doc__.split("\n\n")[0],
        epilog="Any other argument is a Hydra override; +sweep=NAME (configs/sweep/NAME.yaml) is required.")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to attach to (default: $RAY_ADDRESS, else start Ray on this machine)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the sweep, print its plan and the composed sweep block, start nothing")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        parser.error(f"unknown option {unknown[0]} (Hydra overrides look like key=value or +sweep=NAME)")
    if not any(o.split("=", 1)[0].lstrip("+") == "sweep" for o in overrides):
        parser.error("missing +sweep=NAME (one of: "
                     + ", ".join(sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))) + ")")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    from launch.cluster import ClusterResourceError, resolve_address
    from launch.driver import run_sweep, validate
    from launch.spec import SweepConfigError, grid_size

    from hydra.errors import HydraException

    # The user's to fix, reported as one line naming the key: a traceback would bury it.
    user_errors = (SweepConfigError, ClusterResourceError, HydraException, FileNotFoundError, ValueError)
    try:
        cfg = compose(overrides)
        spec = validate(cfg, resolve_address(args.address))
    except user_errors as err:
        print(f"launch/sweep.py: error: {'; '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(OmegaConf.to_yaml(cfg.sweep, resolve=True))
        print(f"# {grid_size(spec)} trial(s) x {spec.resources.num_workers} worker(s); "
              f"metric {spec.metric} ({spec.mode}); scheduler {spec.scheduler.type}")
        return 0
    try:
        outcome = run_sweep(cfg, args.address)
    except (SweepConfigError, ClusterResourceError) as err:  # an attached cluster too small
        print(f"launch/sweep.py: error: {err}", file=sys.stderr)
        return 2
    best = outcome.table.iloc[0] if len(outcome.table) else None
    print(outcome.table.drop(columns=["checkpoint_path", "error"], errors="ignore").to_string(index=False))
    print(f"results: {outcome.results_csv}  {outcome.results_png}")
    if outcome.registered is not None:
        print(f"best trial {best['trial_id']} registered as {outcome.registered.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
