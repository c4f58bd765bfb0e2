"""Per-step training time of methods against the first one, measured on the same machine in one process:
`python -m methods.steptime clip msgclip smartclip [key=value ...]`.

Each method gets its own fields on the same training samples, collated as its loader does (caption tokens cut
where the method allows); a step is forward, backward and AdamW's update (data loading excluded: that is
`throughput.json`'s job), on the GPU where there is one, as training runs there (bf16 autocast, fused AdamW,
TF32 matmuls; `make perf` measures the whole Trainer). Methods are timed in turns, `rounds` times,
and the median step of each is printed with its ratio to the first method's, so a load that comes and goes
affects all of them alike. Prints figures only; nothing is asserted.
"""
from __future__ import annotations

import random
import statistics
import sys
import time

import torch

from methods.train import build, compose_train


def time_steps(methods: list[str], overrides: list[str], *, steps: int = 3, rounds: int = 5) -> dict[str, float]:
    """Median seconds per training step of each method (same config overrides, same samples)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.set_float32_matmul_precision("high")
    setups = {}
    for name in methods:
        torch.manual_seed(0)
        module, dm = build(compose_train([f"method={name}", "data.num_workers=0", *overrides]))
        module.to("cuda" if cuda else "cpu")
        random.seed(0)
        ds = dm.dataset("train")
        batch = dm.collate_fn()([ds[i] for i in range(module.cfg.data.batch_size)])
        batch = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        setups[name] = (module, batch, torch.optim.AdamW(module.parameters(), lr=1e-5, fused=cuda or None))
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, (module, batch, optimizer) in setups.items():
            for _ in range(steps):
                start = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    loss, _ = module.training_loss(batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts[steps:] or ts) for name, ts in times.items()}  # first round: warm-up


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    methods = [a for a in argv if "=" not in a] or ["clip"]
    medians = time_steps(methods, [a for a in argv if "=" in a])
    first = medians[methods[0]]
    for name, t in medians.items():
        print(f"{name:>12}: {t * 1000:8.1f} ms/step  x{t / first:.2f} of {methods[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
