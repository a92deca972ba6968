"""The plan as a table a person reads in one glance."""
from __future__ import annotations

from typing import Any

GB = 1024**3  # the table prints GiB, as nvidia-smi counts


def _gb(x: float) -> str:
    return f"{x / GB:6.2f}"


def _dur(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:6.1f} d"
    return f"{hours:6.1f} h"


def format_plan(plan: dict[str, Any]) -> str:
    st, tot = plan["setting"], plan["totals"]
    h, w = st["img_size"]
    lines = [
        f"{st['model']}: {st['params'] / 1e6:.1f}M params, {h}x{w} px / patch {st['patch_size']} = "
        f"{st['tokens']} tokens, width {st['embed_dim']}, depth {st['depth']}, {st['num_classes']} classes, "
        f"{st['optimizer']}",
        f"{st['gpus']} x {st['gpu']} ({st['gpu_memory'] / GB:.1f} GiB, {st['peak_flops'] / 1e12:.0f} TFLOP/s "
        f"{st['precision']}), {st['nodes']} node(s), {st['bandwidth_gbps']:.0f} GB/s {st['bandwidth_kind']}; "
        f"MFU {st['mfu']:.0%}, headroom {st['headroom']:.0%}, comm overlap {st['comm_overlap']:.0%}, "
        f"attention {st['attention']}",
        f"global batch {tot['global_batch']} = {tot['per_gpu_batch']:g} per GPU; GiB per GPU below "
        f"(act/img: activations per image at the peak of backward; host: CPU memory per GPU)",
        "",
        " ZeRO    AC | params  grads  optim   bufs   host | act/img max mb | mb x acc | compute    comm    step |"
        "      run | fits",
        "------------+-----------------------------------+----------------+----------+-------------------------+"
        "----------+-----",
    ]
    for r in plan["rows"]:
        ac = "none" if r["ac_every"] == 0 else f"{r['ac_every']:>4d}"
        mb = f"{r['micro_batch']:>3d} x {r['accumulation']:<3d}" if r["fits"] else "   -    "
        mark = "*" if r["configured"] else " "
        lines.append(
            f"{mark}{r['stage']:>3s} {ac:>7s} | {_gb(r['params'])} {_gb(r['grads'])} {_gb(r['optim'])} "
            f"{_gb(r['buffers'])} {_gb(r['host'])} | {r['act_per_image'] / GB:7.3f} {r['max_micro_batch']:>6d} | {mb:8s} | "
            f"{r['compute_s']:6.2f}s {r['comm_s']:6.2f}s {r['step_s']:6.2f}s | {_dur(r['run_hours'])} | "
            f"{'yes' if r['fits'] else 'NO'}")
    conf = next(r for r in plan["rows"] if r["configured"])
    ep = f" = {tot['epochs']:.2f} epochs of {tot['dataset_images'] / 1e6:.1f}M" if tot["epochs"] else ""
    lines += [
        "",
        f"* configured: ZeRO-{conf['stage']}, AC {'none' if conf['ac_every'] == 0 else 'every ' + str(conf['ac_every'])}, "
        f"micro-batch {tot['configured_micro_batch']} x accumulation {tot['configured_accumulation']:g} "
        f"({'fits' if tot['configured_fits'] else 'does NOT fit'}: "
        f"{(conf['states'] + conf['buffers'] + tot['configured_micro_batch'] * conf['act_per_image']) / GB:.1f} "
        f"of {st['gpu_memory'] * (1 - st['headroom']) / GB:.1f} GiB usable)",
        f"run: {tot['steps']:,} steps x {tot['global_batch']} = {tot['images'] / 1e9:.3f}B images{ep}; "
        f"{tot['train_flops']:.3e} FLOPs ({tot['train_flops'] / 1e18:,.0f} exaFLOPs, "
        f"{tot['flops_per_image_fwd'] * 3 / 1e9:.1f} GFLOPs per image fwd+bwd)",
        f"     {_dur(tot['wall_clock_hours']).strip()} wall-clock, {tot['gpu_hours']:,.0f} GPU-hours "
        f"(configured row's step time {conf['step_s']:.2f} s)",
        "columns: params/grads/optim = model states as DeepSpeed allocates them (optim = fp32 master + "
        "optimizer states); bufs = reduce buckets (+ ZeRO-3 gathered parameters); max mb = largest "
        "micro-batch that fits; mb x acc = micro-batch dividing the per-GPU batch x gradient "
        "accumulation; step = compute at the MFU (+ recompute) + communication (+ offload traffic).",
    ]
    return "\n".join(lines)
