"""``python -m vitscale.plan [HYDRA OVERRIDES] [--json]``: memory, step time and run totals per ZeRO
stage x activation-checkpointing policy for a training config (see docs/planning.md)."""
from __future__ import annotations

import json
import sys

USAGE = ("usage: python -m vitscale.plan [+experiment=NAME] [plan.gpu=NAME] [plan.gpus=N] "
         "[other Hydra overrides] [--json]")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE + "\n" + (__doc__ or ""))
        return 0
    as_json = "--json" in args
    args = [a for a in args if a != "--json" and not a.startswith("--local_rank")]
    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        print(f"vitscale.plan: unknown option {unknown[0]} ({USAGE})", file=sys.stderr)
        return 2
    try:
        from vitscale.plan.config import compose_config
        from vitscale.plan.planner import make_plan
        from vitscale.plan.report import format_plan

        cfg = compose_config(args)
        as_json = as_json or bool(cfg.plan.get("json", False))
        plan = make_plan(cfg)
    except Exception as err:  # noqa: BLE001 - bad input is one line and exit code 2
        msg = " ".join(str(err).split())
        print(f"vitscale.plan: {msg}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=1) if as_json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
