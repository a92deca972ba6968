"""Reproduction: a torchrun restart reads the dead round's gloo addresses from the agent's store.

    PYTHONPATH=. DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 --max-restarts 1 \
        tests/repro/restart_new_group.py [--dump] [--deepspeed] [--fix]

Round 0 (TORCHELASTIC_RESTART_COUNT=0): default group + GROUPS new_groups + all_reduce, then rank 1
SIGKILLs itself and the agent restarts the group. Round 1 does the same, with rank 0 arriving 1.5 s late at
each group, so rank 1 looks up rank 0's gloo address before rank 0 has published it again. Whether that
breaks a group depends on which side of the gloo pair connects (decided by comparing the two addresses),
so several groups make the failure near certain. Without --fix, round 1 (nearly always) fails with
``Gloo connectFullMesh failed ... Connection refused`` (the address of round 0's rank 0): the agent's
TCPStore outlives the round and torch 2.14 gives it to the workers without a per-attempt prefix.
--dump prints the store's keys before init; --deepspeed initialises through deepspeed.init_distributed
and makes the groups with deepspeed.comm.new_group (as DeepSpeed's _clone_world_group does); --fix
uses vitscale.engine.distributed.elastic_round_store (the fix).
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
tag = f"[attempt {attempt} rank {rank} pid {os.getpid()}]"
print(tag, {k: v for k, v in os.environ.items() if k.startswith(("TORCHELASTIC_R", "TORCHELASTIC_USE", "MASTER"))},
      flush=True)

if "--dump" in sys.argv:
    probe = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    print(tag, "store keys before init:", sorted(probe.list_keys()), flush=True)
    del probe
GROUPS = 4
if attempt > 0:
    faulthandler.dump_traceback_later(40, exit=True)  # a hang shows where it is


def late() -> None:
    if attempt > 0 and rank == 0:
        time.sleep(1.5)


late()

store = None
if "--fix" in sys.argv:
    from vitscale.engine.distributed import elastic_round_store

    store, number = elastic_round_store(rank, world, datetime.timedelta(seconds=60))
    print(tag, "round store", number, flush=True)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
if "--deepspeed" in sys.argv:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the group when --fix made it
    from deepspeed import comm

    comm.new_group(list(range(world)))  # what DeepSpeed's engine does in _clone_world_group
elif store is None:
    dist.init_process_group("gloo")
    print(tag, "default group up", flush=True)
for i in range(GROUPS):
    late()
    dist.new_group(list(range(world)))
    print(tag, f"new_group {i} up", flush=True)

t = torch.ones(1)
dist.all_reduce(t)
print(tag, "all_reduce ok", t.item(), flush=True)

if attempt == 0 and rank == 1:
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
if attempt == 0:
    time.sleep(30)  # rank 0 is stopped by the agent once rank 1 is dead
dist.barrier()
dist.destroy_process_group()
print(tag, "done", flush=True)
