"""vitscale/train.py with the engine's full state dumped right after a resume and right before each
checkpoint save (used by tests/test_elastic.py).

Rank 0 writes ``$ELASTIC_PROBE_DIR/{loaded,saved}_<step>.pt``: every parameter's fp32 master copy
and its Adam ``exp_avg`` / ``exp_avg_sq``, gathered with DeepSpeed's ``safe_get_full_*`` (a
collective on every rank under ZeRO-3), plus the engine's LR and the step. Comparing ``loaded_4``
of a 1-rank run with ``saved_4`` of the 2-rank run that wrote the checkpoint shows what a change of
world size kept, independently of the conversion that carried it.

    torchrun --nproc_per_node 2 tests/dist_scripts/elastic_probe.py HYDRA_OVERRIDES...
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import vitscale.start as start_mod  # noqa: E402
from vitscale.engine import trainer as trainer_mod  # noqa: E402


def full_state(trainer: Any) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, Any] = {"step": trainer.step, "lr": float(trainer.engine.get_lr()[0])}
    for name, param in trainer.engine.module.named_parameters():
        out[f"param/{name}"] = safe_get_full_fp32_param(param).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            if hasattr(param, "ds_id"):  # ZeRO-3
                value = safe_get_full_optimizer_state(param, key)
            else:
                value = _zero12_state(trainer.engine.optimizer, param, key)
            out[f"{key}/{name}"] = value.detach().clone()
    return out


def _zero12_state(zero: Any, param: Any, key: str) -> torch.Tensor:
    """ZeRO 1/2: the slice of this rank's flat optimizer state that belongs to ``param``, summed over
    ranks. (DeepSpeed's safe_get_full_optimizer_state reads fragments linked after the first step,
    which stay empty for a param group whose state did not exist then: measured on the 1-d group.)"""
    full = torch.zeros(param.numel(), dtype=torch.float32)
    mapping = param._hp_mapping
    if mapping is not None:
        flat = zero.single_partition_of_fp32_groups[mapping.param_group_index]
        state = zero.optimizer.state[flat][key]
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        full[lp.start:lp.start + lp.numel] = state[hp.start:hp.start + hp.numel]
    torch.distributed.all_reduce(full)
    return full.reshape(param.shape)


def dump(trainer: Any, kind: str) -> None:
    state = full_state(trainer)  # every rank: ZeRO-3 gathers
    if trainer.dist.rank == 0:
        folder = Path(os.environ["ELASTIC_PROBE_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, folder / f"{kind}_{trainer.step}.pt")


class ProbedTrainer(trainer_mod.Trainer):
    def _resume(self) -> Any:
        result = super()._resume()
        if self.resume_ref is not None:
            dump(self, "loaded")
        return result

    def save_checkpoint(self, metrics: Any = None) -> Any:
        dump(self, "saved")
        return super().save_checkpoint(metrics)


start_mod.Trainer = ProbedTrainer  # train.py builds its Trainer through vitscale.start.build_trainer

if __name__ == "__main__":
    from vitscale import train

    sys.argv[0] = str(REPO / "vitscale" / "train.py")
    train.cli()
