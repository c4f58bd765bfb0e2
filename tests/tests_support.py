"""Shared test settings: the default job made small enough for a 2-core CPU."""

TINY_ARGS = [
    "trainer=debug",
    "data.options.train_size=64",
    "data.options.val_size=32",
    "data.options.test_size=40",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "optim.warmup_steps=2",
]
